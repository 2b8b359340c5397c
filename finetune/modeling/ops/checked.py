"""The transformers functions the rewrites were checked against, pinned by a fingerprint of their source.

A rewrite recognises a model's module by comparing its code with a function of transformers (``LlamaRMSNorm.forward``,
``apply_rotary_pos_emb``, a decoder layer's ``forward``, ...) and then computes what that function computes, its
own way. Were a transformers release to change that function, every copy of it in other families would change with
it and still be recognised, while the rewrite kept the old arithmetic. So a reference counts only while its source
is the one the tests compared against (:data:`CHECKED`); otherwise its rewrite stays off, and the training log's
``fused paths:`` line names the function that changed (:func:`changed`).

The fingerprint is the sha256 of the function's source as ``ast.unparse`` writes it back, docstring and name left
out: the same on every Python version, blind to comments and formatting, changed by any change to the code.
When a transformers upgrade changes one, ``tests/test_checked_references.py`` fails: compare the new code with
the rewrite, run the architecture tests, then record the new fingerprint here.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from typing import Any

# "module:qualname" -> fingerprint, as checked with transformers 5.25.
CHECKED: dict[str, str] = {
    "transformers.models.llama.modeling_llama:LlamaRMSNorm.forward": "8faeb45f3c9473b2",
    "transformers.models.llama.modeling_llama:LlamaMLP.forward": "f537b0e0fd01cec4",
    "transformers.activations:NewGELUActivation.forward": "b067a4b3081f38e8",
    "transformers.models.bloom.modeling_bloom:BloomGelu.forward": "466bc129ac65be47",
    "transformers.models.bloom.modeling_bloom:GeLUFunction.forward": "fe2331f23b4e622a",
    "transformers.models.bloom.modeling_bloom:GeLUFunction.backward": "4f6de22fd6fea105",
    "transformers.models.bloom.modeling_bloom:bloom_gelu_forward": "638c23765134c70d",
    "transformers.models.bloom.modeling_bloom:bloom_gelu_back": "a43d120b8065eaa1",
    "transformers.models.llama.modeling_llama:apply_rotary_pos_emb": "a8b63fd3739393f3",
    "transformers.models.phi3.modeling_phi3:apply_rotary_pos_emb": "896cd36f7bd9e670",
    "transformers.models.gpt_neox.modeling_gpt_neox:apply_rotary_pos_emb": "c7104a9fd3cb08be",
    "transformers.models.llama.modeling_llama:rotate_half": "aa8b8b7c22860ecf",
    "transformers.models.llama.modeling_llama:LlamaDecoderLayer.forward": "34a652c3b03ca15a",
    "transformers.models.gpt2.modeling_gpt2:GPT2Block.forward": "002e3ac0978bdd78",
    "transformers.models.stablelm.modeling_stablelm:StableLmDecoderLayer.forward": "db6eb40a58bb25fe",
    "transformers.models.falcon.modeling_falcon:FalconDecoderLayer.forward": "e76db7ed68d445b5",
    "transformers.models.gpt_neox.modeling_gpt_neox:GPTNeoXLayer.forward": "3b70bd1e29c75c2b",
    "transformers.models.phi3.modeling_phi3:Phi3DecoderLayer.forward": "8b25fde5d2560bd4",
    "transformers.models.olmo2.modeling_olmo2:Olmo2DecoderLayer.forward": "f14aed76d0609497",
    "transformers.models.granite.modeling_granite:GraniteDecoderLayer.forward": "614bce191ba72015",
    "transformers.models.cohere.modeling_cohere:CohereDecoderLayer.forward": "64c6cfa82b412b3d",
    "transformers.models.gemma2.modeling_gemma2:Gemma2DecoderLayer.forward": "4556f5fc4699d3f9",
}


def key(function: Any) -> str:
    """``module:qualname`` of a function, decorators unwrapped."""
    function = inspect.unwrap(function)
    return f"{function.__module__}:{function.__qualname__}"


def fingerprint(function: Any) -> str | None:
    """The sha256 of ``function``'s source without its docstring (None when its source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(function)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    node.name = "_"  # its name is the key's business
    return hashlib.sha256(ast.unparse(node).encode()).hexdigest()[:16]


@functools.cache
def checked(function: Any) -> bool:
    """Whether ``function`` (a reference a rewrite recognises modules by) is the code the rewrite was checked
    against."""
    expected = CHECKED.get(key(function))
    return expected is not None and fingerprint(function) == expected


def changed(references: list[Any]) -> tuple[str, ...]:
    """The short names (``LlamaRMSNorm.forward``) of those ``references`` whose code is not the one checked."""
    return tuple(inspect.unwrap(f).__qualname__ for f in references if not checked(f))
