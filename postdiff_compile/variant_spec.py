"""What a variant does, by name: its deep mode, whether it writes the deep cache, and what it does with the
cross-attention cache and the attention broadcast. The plan is written in these names before anything is captured."""
from __future__ import annotations

from dataclasses import dataclass

from .caches import ATTN_BROADCAST, CROSS_ATTN, DEEPCACHE
from .errors import PostDiffError

DEEP_MODES = ("full", "shallow")
CROSS_ATTN_MODES = ("compute", "write", "read")   # also the attention broadcast's modes
_FLAGS = {"write_dc", "write_ca", "read_ca", "write_ab", "read_ab"}


@dataclass(frozen=True)
class VariantSpec:
    deep: str = "full"             # "shallow": a DeepCache retrieve step, reads the deep feature
    write_deepcache: bool = False  # a full step that also returns the deep feature
    cross_attn: str = "compute"    # "write": also returns every attn2 output; "read": takes them as inputs
    attn_broadcast: str = "compute"  # the same for every self-attention output (passes/attn_broadcast.py)

    def __post_init__(self) -> None:
        if self.deep not in DEEP_MODES or {self.cross_attn, self.attn_broadcast} - set(CROSS_ATTN_MODES):
            raise ValueError(f"not a variant: {self}")
        if self.deep == "shallow" and self.write_deepcache:
            raise ValueError("a shallow variant cannot write the deep feature it reads")

    @property
    def name(self) -> str:
        parts = [self.deep]
        if self.write_deepcache:
            parts.append("write_dc")
        if self.cross_attn != "compute":
            parts.append(f"{self.cross_attn}_ca")
        if self.attn_broadcast != "compute":
            parts.append(f"{self.attn_broadcast}_ab")
        return "+".join(parts)

    @classmethod
    def parse(cls, name: str) -> "VariantSpec":
        deep, *flags = name.split("+")
        both = any(f"write_{c}" in flags and f"read_{c}" in flags for c in ("ca", "ab"))
        if set(flags) - _FLAGS or deep not in DEEP_MODES or both:
            raise PostDiffError(f"not a variant name: {name!r}")
        cross, broadcast = ("write" if f"write_{c}" in flags else "read" if f"read_{c}" in flags else "compute"
                            for c in ("ca", "ab"))
        try:
            return cls(deep, "write_dc" in flags, cross, broadcast)
        except ValueError:
            raise PostDiffError(f"not a variant name: {name!r}") from None

    def serves(self, other: "VariantSpec") -> bool:
        """Whether this variant can run a step planned as `other`: the same computation (deep mode and caches
        read), writing at least the caches `other` writes. The loop keeps only the caches the step writes."""
        return (self.deep, self.reads) == (other.deep, other.reads) and set(other.writes) <= set(self.writes)

    @classmethod
    def union(cls, specs: "list[VariantSpec]") -> "VariantSpec":
        """The one variant that serves every spec in `specs` (which must share deep mode and reads)."""
        first = specs[0]
        if any((s.deep, s.reads) != (first.deep, first.reads) for s in specs):
            raise ValueError(f"no one variant serves {', '.join(s.name for s in specs)}")

        def mode(field: str) -> str:
            modes = {getattr(s, field) for s in specs}
            return "read" if "read" in modes else "write" if "write" in modes else "compute"

        return cls(first.deep, any(s.write_deepcache for s in specs), mode("cross_attn"), mode("attn_broadcast"))

    @property
    def reads(self) -> tuple[str, ...]:
        return ((DEEPCACHE,) if self.deep == "shallow" else ()) + ((CROSS_ATTN,) if self.cross_attn == "read" else ()) \
            + ((ATTN_BROADCAST,) if self.attn_broadcast == "read" else ())

    @property
    def writes(self) -> tuple[str, ...]:
        return ((DEEPCACHE,) if self.write_deepcache else ()) + ((CROSS_ATTN,) if self.cross_attn == "write" else ()) \
            + ((ATTN_BROADCAST,) if self.attn_broadcast == "write" else ())
