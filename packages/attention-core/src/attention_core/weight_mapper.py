"""Map the state_dict of other transformer implementations onto ours.

Example:
    >>> torch_encoder = torch.nn.TransformerEncoder(layer, num_layers=2)  # doctest: +SKIP
    >>> ours.load_state_dict(PytorchMapper().map(torch_encoder.state_dict()))  # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings

from torch import Tensor

__all__ = [
    "DropRule",
    "HugginfaceBertEncoderMapper",
    "LongformerMapper",
    "MappingRule",
    "PytorchMapper",
    "RenameRule",
    "SimpleMapper",
    "SplitRule",
]


class MappingRule:
    """One rule of a mapper: decides whether it handles a key and what it becomes."""

    def matches(self, key: str) -> bool:
        """Return ``True`` if this rule handles ``key``."""
        raise NotImplementedError

    def apply(self, key: str, value: Tensor) -> list[tuple[str, Tensor]]:
        """Return the ``(key, tensor)`` pairs that replace ``key``."""
        raise NotImplementedError


class RenameRule(MappingRule):
    """Rename keys matching the regular expression ``pattern`` to ``replacement``."""

    def __init__(self, pattern: str, replacement: str):
        self.pattern = re.compile(pattern)
        self.replacement = replacement

    def matches(self, key: str) -> bool:
        return self.pattern.fullmatch(key) is not None

    def apply(self, key: str, value: Tensor) -> list[tuple[str, Tensor]]:
        return [(self.pattern.sub(self.replacement, key), value)]


class SplitRule(MappingRule):
    """Split a tensor along dimension 0 into equal parts named by ``replacements``.

    For example a packed query/key/value projection."""

    def __init__(self, pattern: str, replacements: list[str]):
        self.pattern = re.compile(pattern)
        self.replacements = replacements

    def matches(self, key: str) -> bool:
        return self.pattern.fullmatch(key) is not None

    def apply(self, key: str, value: Tensor) -> list[tuple[str, Tensor]]:
        parts = len(self.replacements)
        if value.shape[0] % parts != 0:
            raise ValueError(
                f"cannot split {key!r} of shape {tuple(value.shape)} into {parts} equal parts"
            )
        chunks = value.chunk(parts, dim=0)
        return [
            (self.pattern.sub(name, key), chunk.clone())
            for name, chunk in zip(self.replacements, chunks)
        ]


class DropRule(MappingRule):
    """Drop keys matching ``pattern`` (optionally with a warning that names them)."""

    def __init__(self, pattern: str, warn: str | None = None):
        self.pattern = re.compile(pattern)
        self.warn = warn

    def matches(self, key: str) -> bool:
        return self.pattern.fullmatch(key) is not None

    def apply(self, key: str, value: Tensor) -> list[tuple[str, Tensor]]:
        if self.warn:
            warnings.warn(f"{key}: {self.warn}", stacklevel=4)
        return []


class SimpleMapper:
    """Apply ``RULES`` (first matching rule wins) to every key of a state_dict.

    A key that no rule matches is an error naming it, so a mapping never silently loses
    weights.
    """

    RULES: list[MappingRule] = []

    @classmethod
    def map(cls, state_dict: dict) -> dict:
        """Return a new state_dict with our parameter names."""
        mapped = {}
        for key, value in state_dict.items():
            for rule in cls.RULES:
                if rule.matches(key):
                    for new_key, new_value in rule.apply(key, value):
                        mapped[new_key] = new_value
                    break
            else:
                raise ValueError(f"{cls.__name__} does not know how to map the key {key!r}")
        return mapped


class PytorchMapper(SimpleMapper):
    """Map ``torch.nn.TransformerEncoder`` / ``torch.nn.TransformerDecoder`` weights.

    Build ours with the same sizes, ``activation``, ``dropout`` and
    ``final_normalization=True`` if the torch model has a final ``norm``. Torch's
    ``norm_first=False`` (the default) is the layout used here.
    """

    @classmethod
    def map(cls, state_dict: dict) -> dict:
        decoder = any(".multihead_attn." in k for k in state_dict)
        self_name = "self_attention" if decoder else "attention"
        rules = [
            SplitRule(
                r"(layers\.\d+)\.self_attn\.in_proj_(weight|bias)",
                [rf"\1.{self_name}.{n}_projection.\2" for n in ("query", "key", "value")],
            ),
            SplitRule(
                r"(layers\.\d+)\.multihead_attn\.in_proj_(weight|bias)",
                [rf"\1.cross_attention.{n}_projection.\2" for n in ("query", "key", "value")],
            ),
            RenameRule(
                r"(layers\.\d+)\.self_attn\.out_proj\.(weight|bias)",
                rf"\1.{self_name}.out_projection.\2",
            ),
            RenameRule(
                r"(layers\.\d+)\.multihead_attn\.out_proj\.(weight|bias)",
                r"\1.cross_attention.out_projection.\2",
            ),
            RenameRule(
                r"(layers\.\d+)\.self_attn\.q_proj_weight",
                rf"\1.{self_name}.query_projection.weight",
            ),
            RenameRule(
                r"(layers\.\d+)\.self_attn\.k_proj_weight", rf"\1.{self_name}.key_projection.weight"
            ),
            RenameRule(
                r"(layers\.\d+)\.self_attn\.v_proj_weight",
                rf"\1.{self_name}.value_projection.weight",
            ),
            RenameRule(r"(layers\.\d+\.(?:linear[12]|norm[123])\.(?:weight|bias))", r"\1"),
            RenameRule(r"(norm\.(?:weight|bias))", r"\1"),
        ]
        mapper = type(cls.__name__, (SimpleMapper,), {"RULES": rules})
        return mapper.map(state_dict)


def _bert_rules(prefix: str) -> list[MappingRule]:
    layer = prefix + r"layer\.(\d+)\."
    norm = r"LayerNorm\.(weight|bias|gamma|beta)"
    return [
        RenameRule(
            layer + r"attention\.self\.query\.(weight|bias)",
            r"layers.\1.attention.query_projection.\2",
        ),
        RenameRule(
            layer + r"attention\.self\.key\.(weight|bias)", r"layers.\1.attention.key_projection.\2"
        ),
        RenameRule(
            layer + r"attention\.self\.value\.(weight|bias)",
            r"layers.\1.attention.value_projection.\2",
        ),
        RenameRule(
            layer + r"attention\.output\.dense\.(weight|bias)",
            r"layers.\1.attention.out_projection.\2",
        ),
        _NormRule(layer + r"attention\.output\." + norm, r"layers.\1.norm1.{}"),
        RenameRule(layer + r"intermediate\.dense\.(weight|bias)", r"layers.\1.linear1.\2"),
        RenameRule(layer + r"output\.dense\.(weight|bias)", r"layers.\1.linear2.\2"),
        _NormRule(layer + r"output\." + norm, r"layers.\1.norm2.{}"),
    ]


class _NormRule(RenameRule):
    """Rename a LayerNorm, translating the old ``gamma``/``beta`` names."""

    _NAMES = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}

    def apply(self, key: str, value: Tensor) -> list[tuple[str, Tensor]]:
        match = self.pattern.fullmatch(key)
        name = self._NAMES[match.group(2)]
        return [(match.expand(self.replacement.format(name)), value)]


_BERT_PREFIX = r"(?:(?:bert|roberta|longformer|model)\.)?(?:encoder\.)?"


class HugginfaceBertEncoderMapper(SimpleMapper):
    """Map the encoder of a Hugging Face BERT model onto an encoder built here.

    The source is a ``BertEncoder`` or a whole ``BertModel`` (embeddings and pooler are dropped);
    the target is an encoder built with ``activation="gelu"`` and ``final_normalization=False``."""

    RULES = [
        *_bert_rules(_BERT_PREFIX),
        DropRule(r"(?:(?:bert|roberta|model)\.)?(?:embeddings|pooler)\..*"),
    ]


class LongformerMapper(SimpleMapper):
    """Map a Hugging Face Longformer encoder like `HugginfaceBertEncoderMapper`.

    The global-attention projections (``query_global`` etc.) have no counterpart and are
    dropped with a warning; build ours with ``attention_type="local"``.
    """

    RULES = [
        *_bert_rules(_BERT_PREFIX),
        DropRule(
            _BERT_PREFIX
            + r"layer\.\d+\.attention\.self\.(?:query|key|value)_global\.(?:weight|bias)",
            warn="Longformer global attention has no counterpart; dropped",
        ),
        DropRule(r"(?:(?:longformer|model)\.)?(?:embeddings|pooler)\..*"),
    ]
