"""Model loading and architecture adapters (which modules are decoder layers, norms, Linears)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.preflight import is_hub_id

@dataclass(frozen=True)
class Adapter:
    """Where things live in a Llama-family model (Llama, Mistral, Qwen2, Qwen3).

    ``sequential`` lists the Linears of one decoder layer in true-sequential order: each group is
    quantized after the groups before it, so it sees their quantization error in its inputs."""

    name: str
    sequential: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    layers_path: str = "model.layers"
    # (norm, Linears reading its output) and the Linears writing into the residual stream
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # AWQ: (the op whose output the Linears read, the Linears); its output absorbs 1/s
    awq_groups: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    )
    clip_skip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")  # errors pass through q·k
    # (block, its last Linear, whether the block returns a tuple): the block's output is that Linear
    # applied to its input, so once the block's other Linears are final the input can be reused
    reusable: tuple[tuple[str, str, bool], ...] = (
        ("self_attn", "self_attn.o_proj", True),
        ("mlp", "mlp.down_proj", False),
    )
    value_proj: str = "self_attn.v_proj"
    attn_out_proj: str = "self_attn.o_proj"
    attention_path: str = "self_attn"  # a transformers attention module (calls the configured attention function)
    decoder_path: str = "model"  # the decoder stack: embeddings → layers → final norm, without the LM head
    # whether the norms are plain RMSNorm weights γ (y = γ ⊙ x/rms(x)) that fold into the next Linears;
    # False for (1 + γ) or post-norm architectures (Gemma), which --rotate refuses
    norms_fold: bool = True

    moe: MoeSpec | None = None  # mixture-of-experts layers (None: every layer is dense)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.decoder_path)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_path)

    @contextmanager
    def attention_function(self, layer: nn.Module, name: str) -> Iterator[None]:
        """While inside, ``layer``'s attention calls the function registered with transformers'
        ``AttentionInterface`` as ``name`` (it receives post-RoPE q, k, v and the mask)."""
        config = self.attention(layer).config
        original = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = original

    def check_foldable(self, model: nn.Module) -> None:
        """Raise QuantkitError unless every norm before the residual readers (and the final norm) is
        a plain RMSNorm whose weight folds exactly into the Linears reading it (needed by --rotate)."""
        if not self.norms_fold:
            raise QuantkitError(f"--rotate does not support {self.name}'s norms; quantize without --rotate")

        def check(norm: nn.Module, where: str) -> None:
            if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None:
                raise QuantkitError(f"--rotate cannot fold {where} ({type(norm).__name__}): only RMSNorm with a plain "
                                    "weight folds exactly; quantize without --rotate")

        check(self.final_norm(model), "the final norm")
        for i, layer in enumerate(self.layers(model)):
            for norm_name, _ in self.norm_readers:
                check(layer.get_submodule(norm_name), f"layer {i} {norm_name}")

    def moe_input_norm(self) -> str:
        """The norm whose output the MoE block reads (its router, experts and shared expert)."""
        return next(n for n, readers in self.norm_readers if readers[0].startswith(self.moe.block + "."))

    def linear_names(self) -> list[str]:
        return [name for group in self.sequential for name in group]

    def input_owners(self, names) -> dict[str, str]:
        """{name: the first of ``names`` that reads the same input tensor as it} — the readers of
        each ``awq_groups`` entry share one input (q/k/v; gate/up)."""
        owners = {}
        for name in names:
            readers = next((r for _, r in self.awq_groups if name in r), (name,))
            owners[name] = next(n for n in readers if n in names)
        return owners

    def embed(self, model: nn.Module) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def pre_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules the first decoder layer's inputs are computed with (run on the compute device)."""
        return [self.decoder(model).embed_tokens, self.decoder(model).rotary_emb]

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse MoE block (router + experts), or None for a dense layer (e.g. a
        Qwen2-MoE layer listed in ``mlp_only_layers``)."""
        if self.moe is None:
            return None
        block = layer.get_submodule(self.moe.block)
        return block if hasattr(block, "experts") else None

    def for_layer(self, layer: nn.Module) -> Adapter:
        """This adapter as the dense walk sees ``layer``: for an MoE layer only the attention
        Linears (the experts, the shared expert and their statistics are the MoE stage's)."""
        if self.moe_block(layer) is None:
            return self
        mlp = self.moe.block + "."
        return replace(
            self,
            sequential=tuple(g for g in self.sequential if not g[0].startswith(mlp)),
            norm_readers=tuple(r for r in self.norm_readers if not r[1][0].startswith(mlp)),
            residual_writers=tuple(n for n in self.residual_writers if not n.startswith(mlp)),
            awq_groups=tuple(g for g in self.awq_groups if not g[1][0].startswith(mlp)),
            reusable=tuple(r for r in self.reusable if r[0] + "." != mlp),
        )

    def checkpoint_name(self, name: str) -> str:
        """A layer-relative module/tensor name as the checkpoint on disk spells it (Mixtral's
        ``mlp.`` is ``block_sparse_moe.`` on disk; transformers renames it when loading)."""
        if self.moe is not None and name.startswith(self.moe.block + "."):
            return self.moe.checkpoint_block + name[len(self.moe.block) :]
        return name

    def module_name(self, name: str) -> str:
        """Inverse of ``checkpoint_name``."""
        if self.moe is not None and name.startswith(self.moe.checkpoint_block + "."):
            return self.moe.block + name[len(self.moe.checkpoint_block) :]
        return name

    def dense_names(self, layer: nn.Module) -> dict[str, str]:
        """{state name: checkpoint name} of the layer's tensors outside the routed experts (the
        checkpoint stores those per expert, transformers fused: see ``MoeSpec``)."""
        experts = f"{self.moe.block}.{self.moe.experts}." if self.moe is not None else None
        return {n: self.checkpoint_name(n) for n in layer.state_dict() if experts is None or not n.startswith(experts)}


@dataclass(frozen=True)
class MoeSpec:
    """Where a sparse mixture-of-experts block keeps its parts, in transformers' modules and on disk.

    transformers 5 holds the routed experts fused: ``experts.gate_up_proj`` [E, 2I, C] (gate rows
    first) and ``experts.down_proj`` [E, C, I]; checkpoints (and vLLM, and transformers' own
    conversion mapping) name each expert's Linears: ``{checkpoint_block}.experts.{e}.{gate|up|down}``.
    The router (``gate``) and the shared expert's sigmoid gate stay unquantized."""

    checkpoint_block: str  # "block_sparse_moe" (Mixtral) or "mlp" (Qwen-MoE)
    linears: tuple[str, str, str]  # checkpoint names of an expert's (gate, up, down) Linears
    shared: str | None = None  # the shared expert (an MLP of Linears, all tokens), Qwen2-MoE
    shared_gate: str | None = None  # its sigmoid gate Linear [1, C] (unquantized)
    block: str = "mlp"  # the block's module path inside a decoder layer
    router: str = "gate"
    experts: str = "experts"

    def expert_names(self, e: int) -> tuple[str, str, str]:
        """Layer-relative checkpoint names of expert ``e``'s (gate, up, down) Linears."""
        return tuple(f"{self.checkpoint_block}.{self.experts}.{e}.{n}" for n in self.linears)

    def ignore_patterns(self) -> list[str]:
        """compressed-tensors ``ignore`` entries for the unquantized router and shared gate, in
        transformers' and vLLM's module names (both ``re:`` patterns)."""
        blocks = sorted({self.block, self.checkpoint_block})
        names = [f"{b}\\.{self.router}" for b in blocks]
        if self.shared_gate:
            names += [f"{b}\\.{self.shared_gate}" for b in blocks]
        return [f"re:.*{n}$" for n in dict.fromkeys(names)]


ADAPTERS = {name: Adapter(name) for name in ("llama", "mistral", "qwen2", "qwen3")}
ADAPTERS["mixtral"] = Adapter("mixtral", moe=MoeSpec("block_sparse_moe", ("w1", "w3", "w2")))
ADAPTERS["qwen2_moe"] = Adapter("qwen2_moe", moe=MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj"),
                                                         shared="shared_expert", shared_gate="shared_expert_gate"))
ADAPTERS["qwen3_moe"] = Adapter("qwen3_moe", moe=MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj")))


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise QuantkitError(
            f"unsupported architecture '{model_type}': quantkit supports {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]



def outer_names(names, adapter: Adapter, config) -> list[str]:
    """The tensor names of ``names`` outside the decoder layers, less a tied LM head (it is the embeddings)."""
    layers_prefix = adapter.layers_path + "."
    tied = getattr(config, "tie_word_embeddings", False)
    return [n for n in names if not n.startswith(layers_prefix) and not (tied and n == "lm_head.weight")]


def config_dtype(config, default: torch.dtype) -> torch.dtype:
    """The torch dtype a model config declares (``dtype``, a name or a dtype), else ``default``."""
    dtype = getattr(config, "dtype", None) or default
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_model_source(source: str, allow_pickle: bool) -> None:
    """Refuse a local folder that is missing, holds no weights, or would have pickle weights read
    (whichever way they are named: the only weights file, or an index entry) without ``allow_pickle``."""
    from quantkit.checkpoint import TOKENIZER_FILES, inside, is_pickle, weight_files

    path = Path(source)
    if is_hub_id(source):
        return
    if path.exists() and not path.is_dir():
        raise QuantkitError(f"model path '{source}' is a file: pass the model's folder")
    if not path.is_dir():
        raise QuantkitError(f"model path '{source}' does not exist: pass a local model folder or a hub id")
    if not (path / "config.json").is_file():
        raise QuantkitError(f"'{source}' has no config.json: pass a Hugging Face model folder")
    for name in ("config.json", *TOKENIZER_FILES):  # what is read besides the weights: no link out of the folder
        if (path / name).is_symlink():
            inside(path, name, f"'{source}'")
    files, _ = weight_files(path)
    if not files:
        raise QuantkitError(f"'{source}' holds no weights (*.safetensors): pass a folder with the model's weights")
    pickled = next((f for f in files if is_pickle(f)), None)
    if pickled is not None and not allow_pickle:
        raise QuantkitError(
            f"'{source}' has pickle weights ({pickled.name}), which can run code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )


def check_model_ends(model: nn.Module, adapter: Adapter, source: str) -> None:
    """The embeddings and LM head exist (not left on meta, i.e. randomly initialised) and are finite."""
    for what, module in (("embeddings", adapter.embed(model)), ("LM head", adapter.lm_head(model))):
        w = module.weight
        if w.is_meta:
            raise QuantkitError(f"'{source}' has no {what} weights: the checkpoint is incomplete")
        if not torch.isfinite(w).all():
            raise QuantkitError(f"NaN or Inf in the {what} of '{source}': the checkpoint is damaged")


def _safetensors_source(source: str):
    """The WeightSource of a local safetensors folder, checked against its config before any
    model is built; None for hub ids and pickle checkpoints."""
    from quantkit.checkpoint import WeightSource, check_weights, is_pickle, weight_files

    folder = Path(source)
    if not folder.is_dir() or any(is_pickle(f) for f in weight_files(folder)[0]):
        return None
    weights = WeightSource(folder)
    config = load_config(source)
    check_weights(config, weights.shapes, adapter_for(config), folder)
    return weights


def load_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 — transformers raises many types for a bad config.json
        raise QuantkitError(f"cannot read the model config of '{source}': {' '.join(str(e).split())[:300]}") from None


def load_model(
    source: str,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load (model on CPU, tokenizer, adapter) from a local folder or hub id. ``dtype`` None = checkpoint's."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_model_source(source, allow_pickle)
    config = load_config(source, trust_remote_code)
    adapter = adapter_for(config)
    if not trust_remote_code:
        _safetensors_source(source)
    hf_logging.disable_progress_bar()  # stderr carries quantkit's lines only
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype or "auto",
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError) as e:
        raise QuantkitError(f"cannot load model '{source}': {str(e).splitlines()[0]}") from None
    check_model_ends(model, adapter, source)
    model.eval()
    return model, load_tokenizer(source, trust_remote_code), adapter


def load_model_lazy(source: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer, adapter, weights): decoder layers stay on the meta device and are read from
    ``weights`` (a WeightSource) when the pipeline reaches them. Falls back to ``load_model``
    (weights None) for hub ids, pickle checkpoints and remote code."""
    from quantkit.checkpoint import build_meta, materialize_buffers

    check_model_source(source, allow_pickle)
    weights = None if trust_remote_code else _safetensors_source(source)
    if weights is None:
        model, tokenizer, adapter = load_model(source, None, trust_remote_code, allow_pickle)
        return model, tokenizer, adapter, None
    config = load_config(source)
    adapter = adapter_for(config)
    dtype = config_dtype(config, torch.float32)
    model = build_meta(config, dtype, source)
    state = {n: t.to(dtype) for n, t in weights.read(outer_names(model.state_dict(), adapter, config)).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model, config)
    check_model_ends(model, adapter, source)
    model.eval()
    return model, load_tokenizer(source, trust_remote_code), adapter, weights


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 — tokenizers and transformers raise many types for damaged files
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise QuantkitError(f"cannot load the tokenizer of '{source}' ({detail}): restore its tokenizer files") from None


def compute_device(requested: str | None) -> torch.device:
    """The device layers are quantized on: --device (cpu, cuda, cuda:N), else CUDA when present, else CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise QuantkitError(f"--device {requested!r} is not a device quantkit runs on: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise QuantkitError(f"--device {requested}: no CUDA GPU is available to torch here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise QuantkitError(f"--device {requested}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    return device
