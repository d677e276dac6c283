"""What a variant does, by name: its deep mode, whether it writes the deep cache, and what it does with the
cross-attention cache. The plan is written in these names before anything is captured."""
from __future__ import annotations

from dataclasses import dataclass

from .caches import CROSS_ATTN, DEEPCACHE
from .errors import PostDiffError

DEEP_MODES = ("full", "shallow")
CROSS_ATTN_MODES = ("compute", "write", "read")


@dataclass(frozen=True)
class VariantSpec:
    deep: str = "full"             # "shallow": a DeepCache retrieve step, reads the deep feature
    write_deepcache: bool = False  # a full step that also returns the deep feature
    cross_attn: str = "compute"    # "write": also returns every attn2 output; "read": takes them as inputs

    def __post_init__(self) -> None:
        if self.deep not in DEEP_MODES or self.cross_attn not in CROSS_ATTN_MODES:
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
        return "+".join(parts)

    @classmethod
    def parse(cls, name: str) -> "VariantSpec":
        deep, *flags = name.split("+")
        unknown = set(flags) - {"write_dc", "write_ca", "read_ca"}
        if unknown or deep not in DEEP_MODES or ("write_ca" in flags and "read_ca" in flags):
            raise PostDiffError(f"not a variant name: {name!r}")
        cross = "write" if "write_ca" in flags else "read" if "read_ca" in flags else "compute"
        try:
            return cls(deep, "write_dc" in flags, cross)
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
        cross = first.cross_attn if first.cross_attn == "read" else \
            "write" if any(s.cross_attn == "write" for s in specs) else "compute"
        return cls(first.deep, any(s.write_deepcache for s in specs), cross)

    @property
    def reads(self) -> tuple[str, ...]:
        return ((DEEPCACHE,) if self.deep == "shallow" else ()) + ((CROSS_ATTN,) if self.cross_attn == "read" else ())

    @property
    def writes(self) -> tuple[str, ...]:
        return ((DEEPCACHE,) if self.write_deepcache else ()) + ((CROSS_ATTN,) if self.cross_attn == "write" else ())
