"""Q-Drift: calibration statistics, per-sampler drift rules, scheduler wrappers and peer correctors."""
from .calibration import (
    CALIBRATION_VERSION,
    PairedAccumulator,
    TeacherForcing,
    TrajectoryRecorder,
    calibrate_batch,
    calibrate_denoisers,
)
from .correctors import CORRECTOR_VERSIONS, CORRECTORS, D2DPM, PTQD, Corrector, CumComp, QDrift, make_corrector
from .hooks import StepHook, base_class, wrap_scheduler
from .rules import Coefficients, Schedule, coefficients, sampler_kind, schedule_of
from .statistics import CalibrationPool, DriftStatistics, InvalidStatistics, StatisticsMismatch

__all__ = [
    "CALIBRATION_VERSION", "CORRECTORS", "CORRECTOR_VERSIONS", "CalibrationPool", "Coefficients", "Corrector", "CumComp", "D2DPM", "DriftStatistics", "InvalidStatistics", "PTQD",
    "PairedAccumulator", "QDrift", "Schedule", "StatisticsMismatch", "StepHook", "TeacherForcing",
    "TrajectoryRecorder", "base_class", "calibrate_batch", "calibrate_denoisers", "coefficients",
    "make_corrector", "sampler_kind", "schedule_of", "wrap_scheduler",
]
