"""XLA's own figures of a compiled program: its memory (arguments, outputs, temporaries, aliased
bytes) and its cost analysis (FLOPs, bytes accessed; on CPU a loop body is counted once, whatever
its trip count)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """XLA's memory analysis of one compiled program (bytes per device)."""

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int  # output bytes written into donated argument buffers

  @classmethod
  def of(cls, compiled) -> ProgramMemory:
    mem = compiled.memory_analysis()
    mem = mem[0] if isinstance(mem, (list, tuple)) else mem
    return cls(int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
               int(mem.alias_size_in_bytes))

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def transient_bytes(self) -> int:
    """What the program allocates beyond its (already resident) arguments: XLA's scratch plus every
    output that does not reuse a donated input buffer."""
    return self.temp_bytes + self.output_bytes - self.alias_bytes

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes}


def xla_cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program: `flops` and `bytes_accessed`."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
