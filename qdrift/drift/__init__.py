"""Q-Drift: calibration statistics, per-sampler drift rules, scheduler wrappers and peer correctors."""
from .calibration import (
    PairedAccumulator,
    TeacherForcing,
    TrajectoryRecorder,
    calibrate_batch,
    calibrate_denoisers,
)
from .correctors import CORRECTORS, D2DPM, PTQD, Corrector, QDrift, make_corrector
from .hooks import StepHook, base_class, wrap_scheduler
from .rules import Coefficients, Schedule, coefficients, sampler_kind, schedule_of
from .statistics import CalibrationPool, DriftStatistics, StatisticsMismatch

__all__ = [
    "CORRECTORS", "CalibrationPool", "Coefficients", "Corrector", "D2DPM", "DriftStatistics", "PTQD",
    "PairedAccumulator", "QDrift", "Schedule", "StatisticsMismatch", "StepHook", "TeacherForcing",
    "TrajectoryRecorder", "base_class", "calibrate_batch", "calibrate_denoisers", "coefficients",
    "make_corrector", "sampler_kind", "schedule_of", "wrap_scheduler",
]
