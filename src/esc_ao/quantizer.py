"""EscQuantizer: a torchao PT2E Quantizer for full integer quantization of speech models.

Usage:
    gm = torch.export.export(model, example_inputs).module()
    quantizer = EscQuantizer(QuantConfig(weight_bits=8, act_bits=8, method="esc"))
    quantizer.set_module_name("blocks.3", None)        # keep the last block float
    prepared = prepare_pt2e(gm, quantizer)
    ...calibrate...
    converted = convert_pt2e(prepared)
    print(quantizer.report())                           # what was quantized, and why not
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.observer import PlaceholderObserver
from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer

from esc_ao.annotators import (
    ATTENTION_MATMULS,
    INT8_BMM_POLICY,
    OP_ROLES,
    POLICY,
    RESIDUAL_PRECISIONS,
    TARGETS,
    AttentionMatmuls,
    ResidualPrecision,
    Role,
    Specs,
    Target,
    annotate_node,
    float_tensor_inputs,
    graph_outputs,
    is_annotated,
    residual_adds,
    uses_groups,
)
from esc_ao.config import QuantConfig
from esc_ao.graph_prep import SKIP_KEY, decompose_sdpa, drop_noop_casts
from esc_ao.observers import (
    ActivationObserver,
    EntropyObserver,
    EscObserver,
    GroupWeightObserver,
    MaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelWeightObserver,
    qrange,
)

__all__ = ["AnnotationRecord", "EscQuantizer"]

_OBSERVER_BY_METHOD: dict[str, type[ActivationObserver]] = {
    "max": MaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
    "esc": EscObserver,
}

# Float ops whose outputs are worth naming in the report: they compute in float, and
# their outputs are quantized by the quantized ops that consume them.
_FLOAT_COMPUTE = {
    "aten.gelu.default",
    "aten.silu.default",
    "aten.glu.default",
    "aten.softmax.int",
    "aten._softmax.default",
    "aten.sigmoid.default",
    "aten.tanh.default",
    "aten.relu.default",
    "aten.group_norm.default",
    "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default",
    "aten.embedding.default",
    "aten.div.Tensor",
    "aten.masked_fill.Scalar",
}


_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _reads_softmax(x: object) -> bool:
    """Whether ``x`` is a softmax's output, directly or through passthroughs (views,
    dropout, a dtype-keeping copy)."""
    while isinstance(x, Node) and x.op == "call_function":
        if x.target in _SOFTMAX:
            return True
        if OP_ROLES.get(x.target) != "passthrough" and x.target != torch.ops.aten.to.dtype:
            return False
        x = x.args[0]
    return False


@dataclass(frozen=True)
class AnnotationRecord:
    """One line of the quantization report."""

    node: str
    op: str
    module: str
    quantized: bool
    config: str
    reason: str


def _module_path(node: Node) -> list[tuple[str, str]]:
    """(qualified name, type name) of the modules a node was traced in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for name, typ in stack.values():
        type_name = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        out.append((str(name), type_name))
    return out


def _type_key(module_type: type | str) -> str:
    if isinstance(module_type, str):
        return module_type
    if isinstance(module_type, type):
        return f"{module_type.__module__}.{module_type.__qualname__}"
    raise TypeError(f"module_type={module_type!r} must be a class or its qualified name string")


class EscQuantizer(Quantizer):
    """Annotates an exported graph for full integer quantization.

    Args:
        config: the global QuantConfig; overrides by module name (highest priority) and
            by module type refine it; an override of ``None`` keeps those modules float.
        target: ``"reference"`` (the paper's full integer model, every op's inputs on
            integer grids) or ``"xnnpack"`` (the ops ExecuTorch's XNNPACK delegate runs as
            int8 kernels, with int8 outputs so consecutive integer ops chain without
            float in between); see ``esc_ao.annotators``.
        residual: how the residual stream (the adds a LayerNorm reads, see
            ``esc_ao.annotators.residual_adds``) is held. ``"int8"``: on the config's grid
            like every other tensor; ``"int16"``: residual adds and the LayerNorms reading
            them take 16-bit integer inputs (the W8A16-style stream integer NPUs run;
            reference target only, XNNPACK has no 16-bit kernels); ``"float"``: residual
            adds and the LayerNorm inputs they feed stay float; on the XNNPACK target the
            linears writing the stream run as dynamic int8 GEMMs (float outputs: XNNPACK's
            static GEMMs can only write int8). Either costs no multiply-accumulates off
            int8: the stream is written by adds, which have none.
        attention_probs: ``"int16"``: the softmax outputs an attention matmul reads (the
            attention probabilities) take a 16-bit grid (reference target only). Over
            Whisper's 1500 keys most probabilities are below one int8 step of the largest
            ones and round to zero: on Whisper tiny.en's encoder (real speech, W8A8 MSE)
            keeping them float alone raises the output SQNR from 7.8 to 18.6 dB, more than
            any other group of tensors. Unlike the residual stream this moves
            multiply-accumulates off int8: the context matmul runs 16 x 8 bits.
        attention: the XNNPACK target's attention matmuls (about 40 % of Whisper's
            encoder multiply-accumulates at 1500 frames). ``"float"``: fp32 kernels.
            ``"scores"``: the scores matmul (queries x keys, the one not reading a softmax)
            takes int8 inputs and an int8 output and runs as XNNPACK's static int8 batch
            matmul; the context matmul stays float. ``"int8"``: both. The context matmul's
            int8 input is the attention probabilities, most of which round to zero on an
            int8 grid over 1500 keys (Whisper tiny.en's encoder, W8A8 MSE: output SQNR 19.9
            dB float, 18.5 dB scores, 7.0 dB both). XNNPACK's kernel needs the second
            operand (keys, values) at zero point 0, which the default symmetric grids give;
            with an affine one that matmul runs in fp32 kernels on its quantized inputs.
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        target: Target = "reference",
        residual: ResidualPrecision = "int8",
        attention_probs: Literal["int8", "int16"] = "int8",
        attention: AttentionMatmuls = "float",
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {', '.join(TARGETS)}")
        if residual not in RESIDUAL_PRECISIONS:
            raise ValueError(f"residual={residual!r} is not one of {', '.join(RESIDUAL_PRECISIONS)}")
        if residual == "int16" and target == "xnnpack":
            raise ValueError(
                "residual='int16' needs 16-bit integer kernels, which target='xnnpack' lacks: "
                "use residual='float' there (or target='reference')"
            )
        if attention_probs not in ("int8", "int16"):
            raise ValueError(f"attention_probs={attention_probs!r} is not one of int8, int16")
        if attention_probs == "int16" and target == "xnnpack":
            raise ValueError(
                "attention_probs='int16' on target='xnnpack': XNNPACK has no 16-bit kernels (its attention "
                "matmuls run in float, or int8 with attention='scores'/'int8'); use the reference target"
            )
        if attention not in ATTENTION_MATMULS:
            raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTION_MATMULS)}")
        if attention != "float" and target != "xnnpack":
            raise ValueError(
                f"attention={attention!r} is for target='xnnpack'; target={target!r} quantizes the attention "
                "matmuls' inputs already"
            )
        self.target: Target = target
        self.attention: AttentionMatmuls = attention
        self.residual: ResidualPrecision = residual
        self.attention_probs = attention_probs
        self._residual: set[Node] = set()
        self._outputs: set[Node] = set()
        self.global_config: QuantConfig | None = config if config is not None else QuantConfig()
        self.module_name_config: dict[str, QuantConfig | None] = {}
        self.module_type_config: dict[str, QuantConfig | None] = {}
        self.node_name_config: dict[str, QuantConfig | None] = {}
        self._specs: dict[QuantConfig, Specs] = {}
        self._records: list[AnnotationRecord] = []

    # --- configuration ----------------------------------------------------------------
    def set_global(self, config: QuantConfig | None) -> "EscQuantizer":
        self.global_config = config
        return self

    def set_module_name(self, name: str, config: QuantConfig | None) -> "EscQuantizer":
        """Config for the module with this qualified name and everything inside it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"module name {name!r} must be a non-empty qualified name such as 'blocks.3'")
        self.module_name_config[name] = config
        return self

    def set_module_type(self, module_type: type | str, config: QuantConfig | None) -> "EscQuantizer":
        """Config for every module of this class (or qualified class-name string)."""
        self.module_type_config[_type_key(module_type)] = config
        return self

    def set_node_name(self, name: str, config: QuantConfig | None) -> "EscQuantizer":
        """Config for one node of the exported graph (e.g. "linear_24"), above every
        module override: for ops that no module of their own holds, such as an output
        projection written as ``F.linear`` in the model's forward."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"node name {name!r} must be a non-empty graph node name such as 'linear_24'")
        self.node_name_config[name] = config
        return self

    def config_for(self, node: Node) -> tuple[QuantConfig | None, str]:
        """The config in force for a node and where it came from."""
        if node.name in self.node_name_config:
            return self.node_name_config[node.name], f"node name '{node.name}'"
        path = _module_path(node)
        # Innermost match wins within each kind; names beat types (most specific first).
        for name, _ in reversed(path):
            if name in self.module_name_config:
                return self.module_name_config[name], f"module name '{name}'"
        for _, type_name in reversed(path):
            if type_name in self.module_type_config:
                return self.module_type_config[type_name], f"module type {type_name}"
        return self.global_config, "global"

    def specs(self, config: QuantConfig) -> Specs:
        """The (cached, hence shared) specs of one config."""
        if config not in self._specs:
            if config.weight_group is not None and self.target == "xnnpack":
                # XNNPACK's group-wise (qb4w) GEMMs take dynamically quantized inputs only.
                raise ValueError(
                    f"QuantConfig.weight_group={config.weight_group} on target='xnnpack': XNNPACK runs "
                    "group-wise weights only with dynamic int8 inputs (its 8da4w GEMMs), not with "
                    "static activations; use weight_group=None there, or target='reference'"
                )
            self._specs[config] = _build_specs(config)
        return self._specs[config]

    # --- Quantizer contract -----------------------------------------------------------
    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        drop_noop_casts(model)
        decompose_sdpa(model)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        self._records = []
        self._residual = residual_adds(model.graph.nodes) if self.residual != "int8" else set()
        self._outputs = graph_outputs(model.graph.nodes) if self.target == "xnnpack" else set()
        # Reverse order: a passthrough node is annotated only if a consumer already is.
        for node in reversed(list(model.graph.nodes)):
            if node.op != "call_function":
                continue
            record = self._annotate_one(node)
            if record is not None:
                self._records.append(record)
        self._records.reverse()
        self._check_overrides(model)
        return model

    def _check_overrides(self, model: GraphModule) -> None:
        """An override that matches nothing is a typo, not a request: refused with the
        closest names the graph has (otherwise a --keep-float typo would quantize
        everything and report success)."""
        present: dict[str, set[str]] = {"module name": set(), "module type": set(), "node name": set()}
        for node in model.graph.nodes:
            present["node name"].add(node.name)
            for name, type_name in _module_path(node):
                if name:  # the root module has the empty name
                    present["module name"].add(name)
                present["module type"].add(type_name)
        for kind, wanted in (
            ("module name", self.module_name_config),
            ("module type", self.module_type_config),
            ("node name", self.node_name_config),
        ):
            for key in wanted:
                if key in present[kind]:
                    continue
                close = difflib.get_close_matches(key, sorted(present[kind]), n=3, cutoff=0.5)
                hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(present[kind])[:3])}"
                raise ValueError(
                    f"{kind} {key!r} (set_{kind.replace(' ', '_')}"
                    f"{', --keep-float' if kind == 'module name' else ''}) matches nothing in the "
                    f"exported graph; {hint}"
                )

    def _int8_matmul(self, node: Node, role: Role) -> bool:
        """Whether ``attention`` makes this matmul XNNPACK's int8 batch matmul."""
        if role != "matmul" or self.attention == "float":
            return False
        return self.attention == "int8" or not any(_reads_softmax(a) for a in node.args)

    def _annotate_one(self, node: Node) -> AnnotationRecord | None:
        op = str(node.target)
        role: Role | None = OP_ROLES.get(node.target)
        module = _module_path(node)[-1][0] if _module_path(node) else ""
        if role is None:
            if op in _FLOAT_COMPUTE:
                return AnnotationRecord(
                    node.name,
                    op,
                    module,
                    False,
                    "-",
                    "computed in float; output quantized where a quantized op consumes it",
                )
            return None
        config, source = self.config_for(node)
        if role == "passthrough":
            if config is None or not any(is_annotated(u) for u in node.users):
                return None
            annotate_node(node, role, self.specs(config), self.target)
            return None  # passthroughs are not worth a report line
        if config is None:
            return AnnotationRecord(node.name, op, module, False, "float", f"kept float by {source}")
        if SKIP_KEY in node.meta:
            return AnnotationRecord(node.name, op, module, False, "float", str(node.meta[SKIP_KEY]))
        policy = INT8_BMM_POLICY if self._int8_matmul(node, role) else POLICY[(self.target, role)]
        skip = policy.skip
        if skip is not None:
            return AnnotationRecord(node.name, op, module, False, "float", skip)
        residual = node in self._residual
        if residual and self.residual == "float":
            return AnnotationRecord(
                node.name, op, module, False, "float", "residual stream kept float (residual='float')"
            )
        stream = frozenset(
            float_tensor_inputs(node)
            if residual
            else (a for a in node.args if isinstance(a, Node) and a in self._residual)
        )
        wide = stream if self.residual == "int16" else frozenset()
        if self.attention_probs == "int16" and role == "matmul":
            wide = wide | frozenset(
                a for a in node.args if isinstance(a, Node) and a.op == "call_function" and a.target in _SOFTMAX
            )
        unquantized = stream if self.residual == "float" else frozenset()
        # On the XNNPACK target a float output is a graph output, or (residual="float") a
        # linear writing the float stream: XNNPACK runs both as dynamic int8 GEMMs. Measured
        # on Whisper tiny.en's encoder, W8A8 MSE: output SQNR 2.9 dB with the writers' int8
        # outputs, 18.1 dB with them dynamic (the writers carry the stream's outlier channels).
        writes_stream = self.residual == "float" and role == "weighted" and any(u in self._residual for u in node.users)
        float_out = self.target == "xnnpack" and (node in self._outputs or writes_stream)
        if not annotate_node(node, role, self.specs(config), self.target, wide, unquantized, float_out, policy):
            return AnnotationRecord(
                node.name,
                op,
                module,
                False,
                "float",
                "a graph output: kept float (quantizing it would only round it)"
                if float_out
                else "fewer than two tensor operands (scalar operand folds into the scale)",
            )
        detail = policy.report
        if uses_groups(node, config.weight_group):
            detail = detail.replace("per-channel weight", f"group-{config.weight_group} weight")
        if wide & stream:
            detail += ", residual stream on a 16-bit grid"
        if wide - stream:
            detail += ", attention probabilities on a 16-bit grid"
        if float_out:
            detail = (
                "per-channel weight, dynamic int8 input, float output "
                f"({'a graph output' if node in self._outputs else 'writes the float residual stream'})"
            )
        return AnnotationRecord(
            node.name, op, module, True, config.label, f"{config.method} calibration, {detail} ({source})"
        )

    def validate(self, model: GraphModule) -> None:
        return None

    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq: dict[Any, Any]) -> None:
        # Name each observer after the graph edges it watches, so errors and reports can
        # say "NaN at linear_3 input x" rather than "activation_post_process_17".
        labels: dict[int, list[str]] = {}
        for key, obs in edge_or_node_to_obs_or_fq.items():
            if isinstance(key, Node):
                text = f"output of {key.name}"
            else:
                text = f"{key[1].name} input {key[0].name}"
            labels.setdefault(id(obs), []).append(text)
        for obs in {id(o): o for o in edge_or_node_to_obs_or_fq.values()}.values():
            if isinstance(obs, (ActivationObserver, PerChannelWeightObserver)):
                names = labels[id(obs)]
                obs.label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} shared)"

    # --- report -----------------------------------------------------------------------
    def records(self) -> list[AnnotationRecord]:
        """What the last ``annotate`` quantized and what it left float, with reasons."""
        return list(self._records)

    def report(self) -> str:
        """The records as an aligned, human-readable table."""
        if not self._records:
            return "nothing annotated yet: run prepare_pt2e(model, quantizer) first"
        q = sum(r.quantized for r in self._records)
        lines = [f"{q} of {len(self._records)} compute ops quantized", ""]
        width = max(len(r.node) for r in self._records)
        for r in self._records:
            state = r.config if r.quantized else "float"
            lines.append(f"{r.node:<{width}}  {state:<5}  {r.op:<28}  {r.module:<32}  {r.reason}")
        return "\n".join(lines)


def _build_specs(config: QuantConfig) -> Specs:
    qmin, qmax = qrange(config.act_bits)
    observer = _OBSERVER_BY_METHOD[config.method]
    act = QuantizationSpec(
        dtype=torch.int8,
        quant_min=qmin,
        quant_max=qmax,
        qscheme=torch.per_tensor_symmetric if config.act_symmetric else torch.per_tensor_affine,
        observer_or_fake_quant_ctr=observer.with_args(
            histogram_bins=config.histogram_bins, percentile=config.percentile
        ),
    )
    wide = QuantizationSpec(
        dtype=torch.int16,
        quant_min=qrange(16)[0],
        quant_max=qrange(16)[1],
        qscheme=act.qscheme,
        observer_or_fake_quant_ctr=act.observer_or_fake_quant_ctr,
    )
    # XNNPACK's dynamic int8 GEMM input: per-tensor affine, parameters chosen at run time
    # (the spec ExecuTorch's XNNPACKQuantizer uses for its dynamic configs).
    dynamic = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
        is_dynamic=True,
        observer_or_fake_quant_ctr=PlaceholderObserver.with_args(eps=2**-12),
    )
    wmin, wmax = qrange(config.weight_bits, weight=True)
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=wmin,
        quant_max=wmax,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=PerChannelWeightObserver,
    )
    grouped = (
        None
        if config.weight_group is None
        else QuantizationSpec(
            dtype=torch.int8,
            quant_min=wmin,
            quant_max=wmax,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
            observer_or_fake_quant_ctr=GroupWeightObserver.with_args(group_size=config.weight_group),
        )
    )
    return Specs(
        activation=act, weight=weight, wide=wide, dynamic=dynamic, grouped=grouped, group_size=config.weight_group
    )
