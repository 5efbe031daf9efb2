"""Raw error samples of calibration runs, for the paper's Fig. 4 and Fig. 5.

Each run keeps u and e at a few latent coordinates, and e over a few channels, at the first,
middle and last step. Which coordinates is a function of the latent's shape alone, so run k keeps
the same values whatever batch it was computed in; a few KB per run whatever the model's size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from qdrift.cache import atomic_write_bytes, read_safetensors, safetensors_bytes

# Raw samples kept per run (ErrorSamples): a few KB per run whatever the model's size.
SAMPLE_COORDINATES = 16    # Fig. 4: u and e at these many latent coordinates
FIELD_CHANNELS = 2         # Fig. 5: e over the first channels ...
FIELD_POSITIONS = 128      # ... at up to this many positions each (all of them in a small latent)
SAMPLES_FORMAT = "qdrift-error-samples/1"


def sample_steps(num_steps: int) -> list[int]:
    """The steps whose raw samples a run keeps: first, middle and last."""
    return sorted({0, num_steps // 2, num_steps - 1})


def _spread(count: int, n: int) -> torch.Tensor:
    """`count` indices spread evenly over range(n), each at the middle of its equal share."""
    count = min(count, n)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * n / count).long()


def sample_coordinates(channels: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a run's (channel, position) grid (`by_channel` view, c * positions + p):
    the Fig. 4 coordinates, spread over all channels and positions, and the Fig. 5 field, up to
    FIELD_POSITIONS evenly spread positions of each of the first FIELD_CHANNELS channels."""
    points = _spread(SAMPLE_COORDINATES, channels * positions)
    per_channel = _spread(FIELD_POSITIONS, positions)
    field_points = torch.cat([c * positions + per_channel for c in range(min(FIELD_CHANNELS, channels))])
    return points, field_points


@dataclass
class ErrorSamples:
    """Raw (u, e) of N calibration runs at the steps `steps`.

    `u`, `e`: (N, S', P) at the flat coordinates `points`; `field`: e, (N, S', D) at `field_points`
    (flat index c * positions + p into the `by_channel` view of the latent, channels x positions).
    """

    steps: list[int]
    channels: int
    positions: int
    points: torch.Tensor
    field_points: torch.Tensor
    u: torch.Tensor
    e: torch.Tensor
    field: torch.Tensor
    manifest: dict = field(default_factory=dict)

    @property
    def num_runs(self) -> int:
        return self.u.shape[0]

    def point_label(self, j: int) -> str:
        c, p = divmod(int(self.points[j]), self.positions)
        return f"channel {c}, position {p}"

    def extend(self, more: "ErrorSamples") -> "ErrorSamples":
        """These runs followed by the runs of `more` (same steps and coordinates)."""
        if (more.steps, more.channels, more.positions) != (self.steps, self.channels, self.positions) or \
                not torch.equal(more.points, self.points) or not torch.equal(more.field_points, self.field_points):
            raise ValueError("cannot join error samples kept at other steps or coordinates")
        return ErrorSamples(self.steps, self.channels, self.positions, self.points, self.field_points,
                            torch.cat([self.u, more.u]), torch.cat([self.e, more.e]),
                            torch.cat([self.field, more.field]),
                            dict(self.manifest, seeds=self.manifest.get("seeds", []) + more.manifest.get("seeds", [])))

    def save(self, path: str | Path) -> None:
        meta = {"steps": self.steps, "channels": self.channels, "positions": self.positions, **self.manifest}
        tensors = {"u": self.u, "e": self.e, "field": self.field, "points": self.points, "field_points": self.field_points}
        atomic_write_bytes(path, safetensors_bytes(tensors, SAMPLES_FORMAT, meta))

    @classmethod
    def load(cls, path: str | Path) -> "ErrorSamples":
        try:
            t, manifest = read_safetensors(path, SAMPLES_FORMAT, {"u", "e", "field", "points", "field_points"})
            steps, channels, positions = manifest.pop("steps"), manifest.pop("channels"), manifest.pop("positions")
        except (ValueError, KeyError) as err:
            raise ValueError(f"unreadable error samples file {path} ({err})") from err
        return cls(steps, channels, positions, t["points"], t["field_points"], t["u"], t["e"], t["field"], manifest)
