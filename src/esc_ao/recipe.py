"""A quantization recipe: what is done around calibration. The annotation target,
float-exact transforms of the exported graph before annotation (esc_ao.transforms) and how
the residual stream is held (EscQuantizer's ``residual``). Written as a suffix of a
calibration method in the accuracy benchmark, e.g. ``mse+r16+sq``:

- ``+xnn``: the XNNPACK target (what ExecuTorch's XNNPACK delegate runs as int8 kernels;
  default: the reference target, full integer);
- ``+r16``: the residual stream on a 16-bit integer grid (reference target);
- ``+rf``: the residual stream in float (the XNNPACK target's counterpart);
- ``+qk8``: the attention scores matmul (queries x keys) as XNNPACK's int8 batch matmul
  (XNNPACK target; EscQuantizer's ``attention="scores"``); ``+att8`` both attention
  matmuls (``attention="int8"``);
- ``+p16``: attention probabilities (softmax outputs read by a matmul) on a 16-bit grid
  (reference target);
- ``+had``: Hadamard rotation of every pre-LayerNorm residual stream, folded into the
  weights (esc_ao.transforms.rotate); ``+hadN`` also rotates the input of every linear
  that reads an activation function (the MLP's second linear) online, in blocks of N
  channels;
- ``+sq``: SmoothQuant-style smoothing of every LayerNorm -> linear site, alpha per site;
- ``+gptq``: GPTQ rounding of every linear's weights (after smoothing, when both);
  ``+gptqa`` the same with GPTQ's act-order (columns in decreasing Hessian diagonal);
- ``+t8``: under 4-bit weights, a linear whose weight is tied to an embedding (Whisper's
  output projection) keeps 8-bit weights, as LLM quantizers keep their output heads;
- ``+c8``: under 4-bit weights, convolutions keep 8-bit weights (Whisper's two-conv front
  end: on tiny.en's audio part its 4-bit weights alone cost more output SQNR than all
  4-bit linears, at about 6 % of the multiply-accumulates);
- ``+gN``: group-wise linear weights, one scale per N input channels of each output
  channel (QuantConfig.weight_group; reference target: XNNPACK runs such weights only
  with dynamic inputs);
- ``+mpN``: mixed precision (esc_ao.precision): the most sensitive layer groups, at most
  N % of the weighted ops' multiply-accumulates, raised to float at W8A8 and to W8A8
  under a 4-bit config.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.fx import GraphModule

from esc_ao.annotators import OP_ROLES, AttentionMatmuls, ResidualPrecision, Target
from esc_ao.config import QuantConfig
from esc_ao.graph_prep import tied_linears
from esc_ao.pipeline import Batch, observe, prepare
from esc_ao.precision import PrecisionPlan, plan_precision
from esc_ao.quantizer import EscQuantizer
from esc_ao.transforms import ROTATION_KEY, TransformRecord, gptq, rotate, smooth

__all__ = ["RECIPE_FLAGS", "Prepared", "Recipe", "main_job_recipe", "split_method"]

RECIPE_FLAGS: dict[str, str] = {
    "xnn": "XNNPACK target",
    "r16": "residual stream on a 16-bit grid",
    "rf": "residual stream in float",
    "qk8": "attention scores matmul in int8 kernels",
    "att8": "both attention matmuls in int8 kernels",
    "p16": "attention probabilities on a 16-bit grid",
    "had": "Hadamard-rotated residual stream",
    "sq": "LayerNorm -> linear smoothing",
    "gptq": "GPTQ weight rounding",
    "gptqa": "GPTQ weight rounding, act-order",
    "t8": "tied output projections at 8-bit weights",
    "c8": "convolutions at 8-bit weights",
}
_RESIDUAL_FLAG: dict[str, ResidualPrecision] = {"r16": "int16", "rf": "float"}
_ATTENTION_FLAG: dict[str, AttentionMatmuls] = {"qk8": "scores", "att8": "int8"}
SMOOTH_BATCHES = 8  # calibration batches smoothing measures channel ranges on
GPTQ_BATCHES = 32  # calibration batches GPTQ's Hessians are estimated on
PLAN_BATCHES = 4  # calibration batches the precision plan's sensitivities are measured on
# the weighted ops that are not linears: what +c8 keeps at 8-bit weights
_CONVS = {t for t, role in OP_ROLES.items() if role == "weighted"} - {torch.ops.aten.linear.default}


@dataclass(frozen=True)
class Recipe:
    """``target``: EscQuantizer's target; ``residual``: its residual-stream precision;
    ``rotate``: esc_ao.transforms.rotate first (``rotate_block``: its online MLP block);
    ``smooth``: then esc_ao.transforms.smooth; ``gptq``: then esc_ao.transforms.gptq at
    the config's weight bits."""

    target: Target = "reference"
    residual: ResidualPrecision = "int8"
    smooth: bool = False
    gptq: bool = False
    act_order: bool = False
    tied_8bit: bool = False
    conv_8bit: bool = False
    weight_group: int | None = None
    precision_budget: float | None = None
    rotate: bool = False
    rotate_block: int | None = None
    probs16: bool = False
    attention: AttentionMatmuls = "float"

    def __post_init__(self) -> None:
        if self.weight_group is not None:
            QuantConfig(weight_group=self.weight_group)  # the same check, where the recipe is written
            if self.target == "xnnpack":
                raise ValueError(
                    f"weight_group={self.weight_group} on the XNNPACK target: XNNPACK runs group-wise "
                    "weights only with dynamic int8 inputs; drop +g/--weight-group or use the reference "
                    "target"
                )
        if self.act_order and not self.gptq:
            raise ValueError("act_order=True needs gptq=True (recipe flag +gptqa)")
        if self.rotate_block is not None and (
            not self.rotate or self.rotate_block < 2 or self.rotate_block & (self.rotate_block - 1)
        ):
            raise ValueError(
                f"rotate_block={self.rotate_block!r} needs rotate=True and a power of two >= 2 "
                "(recipe flag +hadN, e.g. +had64)"
            )
        if self.precision_budget is not None and not 0.0 < self.precision_budget <= 1.0:
            raise ValueError(
                f"precision_budget={self.precision_budget!r} must lie in (0, 1] (a fraction of the "
                "multiply-accumulates), or None for no mixed precision"
            )
        # the same checks EscQuantizer makes, at the place the recipe is written
        if self.probs16 and self.target == "xnnpack":
            raise ValueError(
                "attention probabilities on a 16-bit grid (+p16) on the XNNPACK target: XNNPACK has no "
                "16-bit kernels; drop +p16 or use the reference target"
            )
        if self.attention != "float" and self.target != "xnnpack":
            raise ValueError(
                f"attention matmuls {self.attention!r} (--attention, recipe +qk8/+att8) pick XNNPACK's int8 batch "
                "matmul: they need the XNNPACK target (--target xnnpack, recipe +xnn); the reference target "
                "quantizes attention inputs already"
            )
        if self.residual == "int16" and self.target == "xnnpack":
            raise ValueError(
                "residual stream 'int16' on the XNNPACK target: XNNPACK has no 16-bit kernels; use "
                "'float' (recipe +xnn+rf, --residual float) or the reference target"
            )

    @property
    def suffix(self) -> str:
        """``+r16+sq`` style; empty for the plain recipe."""
        flags = (
            (["xnn"] if self.target == "xnnpack" else [])
            + [f for f, r in _RESIDUAL_FLAG.items() if r == self.residual]
            + [f for f, a in _ATTENTION_FLAG.items() if a == self.attention]
            + (["p16"] if self.probs16 else [])
            + ([f"had{self.rotate_block or ''}"] if self.rotate else [])
            + (["sq"] if self.smooth else [])
            + ([("gptqa" if self.act_order else "gptq")] if self.gptq else [])
            + (["t8"] if self.tied_8bit else [])
            + (["c8"] if self.conv_8bit else [])
            + ([f"g{self.weight_group}"] if self.weight_group is not None else [])
            + ([f"mp{100 * self.precision_budget:g}"] if self.precision_budget is not None else [])
        )
        return "".join(f"+{f}" for f in flags)

    def describe(self) -> str:
        parts = [
            RECIPE_FLAGS[f]
            if f in RECIPE_FLAGS
            else f"Hadamard-rotated residual stream and {f[3:]}-channel blocks into MLP linears"
            if f.startswith("had")
            else f"group-{f[1:]} weights"
            if f.startswith("g")
            else f"mixed precision within {f[2:]} % of MACs"
            for f in self.suffix.split("+")
            if f
        ]
        return ", ".join(parts) or "plain (reference target, int8 residual stream, no transforms)"

    def configure(self, config: QuantConfig) -> QuantConfig:
        """``config`` with this recipe's weight grouping."""
        if self.weight_group is None:
            return config
        return dataclasses.replace(config, weight_group=self.weight_group)

    def transform(self, gm: GraphModule, batches: Sequence[Batch], config: QuantConfig) -> list[TransformRecord]:
        """Rewrites ``gm`` in place (before prepare); returns what each transform did."""
        config = self.configure(config)
        records: list[TransformRecord] = []
        if self.rotate:
            records += rotate(gm, mlp_block=self.rotate_block)
        if self.smooth:
            records += smooth(
                gm, list(batches)[:SMOOTH_BATCHES], act_bits=config.act_bits, weight_bits=config.weight_bits
            )
        if self.gptq:
            records += gptq(
                gm, list(batches)[:GPTQ_BATCHES], config.weight_bits, config.weight_group, act_order=self.act_order
            )
        return records

    def quantizer(self, config: QuantConfig, graph: GraphModule | None = None) -> EscQuantizer:
        """EscQuantizer for this recipe; with ``graph`` (the exported graph it will prepare)
        and a 4-bit config, its overrides: tied-weight linears (``tied_8bit``) and convs
        (``conv_8bit``) at 8-bit weights, online rotations at 8-bit inputs."""
        config = self.configure(config)
        quantizer = EscQuantizer(
            config,
            target=self.target,
            residual=self.residual,
            attention_probs="int16" if self.probs16 else "int8",
            attention=self.attention,
        )
        if self.tied_8bit and graph is not None and config.weight_bits == 4:
            for name in tied_linears(graph):
                quantizer.set_node_name(name, dataclasses.replace(config, weight_bits=8))
        if self.conv_8bit and graph is not None and config.weight_bits == 4:
            for node in graph.graph.nodes:
                if node.op == "call_function" and node.target in _CONVS:
                    quantizer.set_node_name(node.name, dataclasses.replace(config, weight_bits=8))
        if graph is not None and 4 in (config.weight_bits, config.act_bits):
            for node in graph.graph.nodes:
                kind = node.meta.get(ROTATION_KEY)
                if kind is None:
                    continue
                # An online rotation reads the unrotated tensor (a GELU's output with its
                # outliers): on a 4-bit grid that tensor would be ruined before the rotation
                # could help, so its input keeps 8 bits, as an integer Hadamard transform
                # (additions only) would. A d x d rotation's weight is not +-1/sqrt(d) alone:
                # 4 bits would round it; a block one's is exact on any grid.
                quantizer.set_node_name(
                    node.name,
                    dataclasses.replace(config, act_bits=8, weight_bits=8 if kind == "dense" else config.weight_bits),
                )
        return quantizer

    def prepare(
        self, gm: GraphModule, batches: Sequence[Batch], config: QuantConfig, keep_float: Sequence[str] = ()
    ) -> Prepared:
        """Transforms ``gm`` (in place), prepares and observes it; with a precision budget,
        measures the plan on the observed model, then prepares and observes a copy of the
        transformed graph again with the plan's overrides."""
        transforms = self.transform(gm, batches, config)
        budget = self.precision_budget
        pristine = copy.deepcopy(gm) if budget is not None else None  # prepare consumes its graph
        quantizer = self._with_float(self.quantizer(config, gm), keep_float)
        prepared = prepare(gm, quantizer)
        observe(prepared, batches)
        if budget is None or pristine is None:
            return Prepared(prepared, quantizer, transforms, None)
        plan = plan_precision(prepared, list(batches)[:PLAN_BATCHES], budget)
        higher = (
            None
            if (config.weight_bits, config.act_bits) == (8, 8)
            else dataclasses.replace(self.configure(config), weight_bits=8, act_bits=8)
        )
        quantizer = plan.apply(self._with_float(self.quantizer(config, pristine), keep_float), higher)
        prepared = prepare(pristine, quantizer)
        observe(prepared, batches)
        return Prepared(prepared, quantizer, transforms, plan)

    @staticmethod
    def _with_float(quantizer: EscQuantizer, keep_float: Sequence[str]) -> EscQuantizer:
        for name in keep_float:
            quantizer.set_module_name(name, None)
        return quantizer


def main_job_recipe(target: Target = "xnnpack", weight_bits: int = 8) -> Recipe:
    """What ``esc-ao quantize`` applies unless told otherwise: smoothing; the residual
    stream in float on the XNNPACK target and on a 16-bit grid on the reference target; at
    4-bit weights GPTQ rounding and convolutions kept at 8-bit weights (measured on Whisper
    tiny.en W4A8, real speech: 7.41 % WER -> 5.44 % for about 6 % of the encoder's
    multiply-accumulates at 8 bits; docs/results/accuracy.md)."""
    four = weight_bits == 4
    return Recipe(
        target=target,
        residual="int16" if target == "reference" else "float",
        smooth=True,
        gptq=four,
        conv_8bit=four,
    )


@dataclass
class Prepared:
    """An observed prepared model, its quantizer (None when another quantizer, such as
    Arm's, prepared it), what the transforms did, and the precision plan (None without a
    budget)."""

    model: GraphModule
    quantizer: EscQuantizer | None
    transforms: list[TransformRecord]
    plan: PrecisionPlan | None


def split_method(method: str) -> tuple[str, Recipe]:
    """``"mse+r16+sq"`` -> ``("mse", Recipe(residual="int16", smooth=True))``.

    Raises:
        ValueError: naming an unknown flag, a repeated one, both residual flags, or a
            mixed-precision budget that is not a percentage.
    """
    base, *flags = method.split("+")
    unknown = [
        f
        for f in flags
        if f not in RECIPE_FLAGS and not f.startswith("mp") and not _is_group(f) and not _is_rotation(f)
    ]
    if unknown:
        raise ValueError(
            f"method {method!r}: unknown recipe flag(s) {', '.join(unknown)}; use "
            + ", ".join(f"+{f} ({d})" for f, d in RECIPE_FLAGS.items())
            + ", +hadN (rotation with N-channel online MLP blocks), +gN (group-wise weights, N a power "
            "of two >= 8), +mpN (mixed precision)"
        )
    groups = [int(f[1:]) for f in flags if _is_group(f)]
    flags = [f for f in flags if not _is_group(f)]
    if len(groups) > 1:
        raise ValueError(f"method {method!r}: one weight-group flag +gN at most")
    rotations = [f for f in flags if _is_rotation(f)]
    flags = [f for f in flags if not _is_rotation(f)]
    if len(rotations) > 1:
        raise ValueError(f"method {method!r}: one rotation flag +had or +hadN at most")
    budgets = [f for f in flags if f.startswith("mp")]
    flags = [f for f in flags if not f.startswith("mp")]
    if len(budgets) > 1 or any(not _is_percent(b[2:]) for b in budgets):
        raise ValueError(
            f"method {method!r}: one mixed-precision flag +mpN at most, N a percentage of the "
            "multiply-accumulates in (0, 100], e.g. +mp10"
        )
    if (
        len(set(flags)) != len(flags)
        or sum(f in _RESIDUAL_FLAG for f in flags) > 1
        or sum(f in _ATTENTION_FLAG for f in flags) > 1
        or {"gptq", "gptqa"} <= set(flags)
    ):
        raise ValueError(
            f"method {method!r}: each flag at most once, one residual flag (+r16 or +rf), one attention "
            "flag (+qk8 or +att8) and one GPTQ flag (+gptq or +gptqa)"
        )
    residual: ResidualPrecision = next((_RESIDUAL_FLAG[f] for f in flags if f in _RESIDUAL_FLAG), "int8")
    return base, Recipe(
        target="xnnpack" if "xnn" in flags else "reference",
        residual=residual,
        smooth="sq" in flags,
        gptq="gptq" in flags or "gptqa" in flags,
        act_order="gptqa" in flags,
        tied_8bit="t8" in flags,
        conv_8bit="c8" in flags,
        weight_group=groups[0] if groups else None,
        precision_budget=float(budgets[0][2:]) / 100 if budgets else None,
        probs16="p16" in flags,
        attention=next((_ATTENTION_FLAG[f] for f in flags if f in _ATTENTION_FLAG), "float"),
        rotate=bool(rotations),
        rotate_block=int(rotations[0][3:]) if rotations and rotations[0][3:] else None,
    )


def _is_rotation(flag: str) -> bool:
    return flag[:3] == "had" and (flag[3:] == "" or flag[3:].isdigit())


def _is_group(flag: str) -> bool:
    return flag[:1] == "g" and flag[1:].isdigit()


def _is_percent(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 100.0
    except ValueError:
        return False
