"""Modality names exactly as the OpenMind CSV writes them, and the aliases users type.

The published MAE recipe spells two of them "inplainT1"/"inplainT2"; the CSV writes "inplaneT1"/
"inplaneT2". Both spellings select the same rows, so a preset or a command line may use either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from openmind_tools.errors import ConfigError

OPENMIND_MODALITIES = (
    "T1w", "T2w", "FLAIR", "inplaneT1", "inplaneT2", "MP2RAGE", "UNIT1", "UNIT1_denoised", "T1map", "T2map",
    "T2starw", "T2starmap", "PDw", "FLASH", "SWI", "minIP", "angio", "sbref", "DWI", "TRACE", "ADC", "MD", "FA",
    "PET",
)  # fmt: skip
ALIASES = {"inplainT1": "inplaneT1", "inplainT2": "inplaneT2"}


def canonical_modalities(names: Iterable[str], present: Sequence[str] | None = None) -> list[str]:
    """Map user spellings to CSV spellings; a name neither known nor present is an error listing `present`."""
    known = set(OPENMIND_MODALITIES) | set(present or ())
    out = []
    for name in names:
        name = ALIASES.get(name.strip(), name.strip())
        if name not in known:
            listed = ", ".join(sorted(present)) if present is not None else ", ".join(OPENMIND_MODALITIES)
            raise ConfigError(f"unknown modality {name!r}; modalities present: {listed}")
        out.append(name)
    return out
