"""The common construction interface of all builders."""

from __future__ import annotations

__all__ = ["BaseBuilder"]


class BaseBuilder:
    """Base class of the builders.

    Builders collect settings as attributes, validate them as they are set, and construct a module
    with `get`."""

    @classmethod
    def from_kwargs(cls, strict: bool = True, **kwargs):
        """Create a builder from keyword arguments.

        Arguments:
            strict: raise on unknown names (default) instead of ignoring them.
            **kwargs: builder settings and attention parameters.
        """
        return cls.from_dictionary(kwargs, strict=strict)

    @classmethod
    def from_namespace(cls, args, strict: bool = False):
        """Create a builder from an ``argparse.Namespace``.

        Unknown names are ignored unless ``strict``."""
        return cls.from_dictionary(vars(args), strict=strict)

    @classmethod
    def from_dictionary(cls, dictionary: dict, strict: bool = True):
        """Create a builder from a dictionary of settings.

        Arguments:
            dictionary: ``{name: value}``.
            strict: raise ``ValueError`` naming an unknown key (default) instead of skipping it.
        """
        builder = cls()
        for key, value in dictionary.items():
            try:
                setattr(builder, key, value)
            except AttributeError as e:
                if strict:
                    raise ValueError(f"{cls.__name__} has no setting {key!r}: {e}") from None
        return builder

    def get(self, *args, **kwargs):
        """Construct the module."""
        raise NotImplementedError
