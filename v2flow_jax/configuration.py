"""Typed config sections: a frozen dataclass read from one `config.<section>` with field-naming errors."""
from __future__ import annotations

import dataclasses


class ConfigSection:
    """Mixin for frozen dataclasses: `from_config` rejects unknown fields, `validate` checks values."""
    SECTION = "section"

    @classmethod
    def from_config(cls, section_config):
        fields = {f.name for f in dataclasses.fields(cls)}
        given = dict(section_config)
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ValueError(f"config.{cls.SECTION} has unknown fields {unknown}; known fields: {sorted(fields)}.")
        cfg = cls(**given)
        cfg.validate()
        return cfg

    def require(self, ok: bool, field: str, message: str) -> None:
        if not ok:
            raise ValueError(f"config.{self.SECTION}.{field}={getattr(self, field)!r}: {message}")

    def validate(self) -> None:
        pass
