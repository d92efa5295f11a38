"""How results are shown: the main job's report as Markdown, ESC's convergence as a PNG.
What is measured lives in esc_ao.report and esc_ao.job; this module only formats it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esc_ao.atomic import atomic_path

__all__ = ["plot_convergence", "render_markdown"]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: summary, per-layer SQNR, activation ranges."""
    cfg, size = report["config"], report["size"]
    lines: list[str] = [
        f"# esc-ao quantization report: {report['model']}",
        "",
        f"- config: {cfg['label']}, method {cfg['method']}, "
        f"{'symmetric' if cfg['act_symmetric'] else 'affine'} activations",
        f"- calibration batches: {report['calibration_batches']}, held-out batches: {report['heldout_batches']}",
        f"- output SQNR vs float (held-out): **{_fmt(report['output_sqnr_db'])} dB**",
        *(
            [
                f"- held-out WER (greedy, float decoder): **{100 * report['task']['quantized']['wer']:.2f} %** "
                f"with this encoder, {100 * report['task']['float']['wer']:.2f} % with the float one "
                f"({report['task']['float']['utterances']} clips)"
            ]
            if report.get("task")
            else []
        ),
        f"- weights: {size['float32_bytes'] / 1e6:.2f} MB float32 -> {size['quantized_bytes'] / 1e6:.2f} MB "
        f"at {cfg['weight_bits']} bits"
        + (f"; saved program {size['program_file_bytes'] / 1e6:.2f} MB" if "program_file_bytes" in size else ""),
        f"- kept float: {', '.join(report['keep_float']) or 'nothing'}; annotation target: "
        f"{report.get('target', 'reference')}",
        (f"- precision plan: {report['precision_plan']['summary']}\n" if report.get("precision_plan") else "")
        + f"- recipe: {report['recipe']['description']}"
        + (
            f"; smoothed {sum(t['applied'] for t in report['transforms'])} of {len(report['transforms'])} "
            "LayerNorm sites (table below)"
            if report["transforms"]
            else ""
        ),
        f"- calibration time: {report['calibration_seconds']:.1f} s",
    ]
    pte = report.get("executorch")
    if pte:
        lines.append(
            f"- ExecuTorch program model.pte: {pte['size_bytes'] / 1e6:.2f} MB; {pte['summary']}; "
            f"output SQNR vs the converted graph {pte['sqnr_db']:.1f} dB"
            + (
                f", vs float {pte['program_vs_float_db']:.1f} dB (graph: {pte['graph_vs_float_db']:.1f} dB)"
                if pte.get("program_vs_float_db") is not None
                else ""
            )
        )
    if report.get("ethosu"):
        lines += _ethosu_lines(report["ethosu"])
    esc = report.get("esc")
    if esc:
        lines += [
            f"- ESC: {len(esc['labels'])} activation scales; objective {esc['initial_objective']:.5g} "
            f"(local step) -> {esc['final_objective']:.5g} after {esc['evaluations']} evaluations "
            f"({esc['evaluations_per_second']:.2f}/s); {esc['message']}",
        ]
        if esc.get("stages"):
            lines += [
                "",
                "## ESC staged search",
                "",
                "Objective of a stage: the noise-to-signal ratio of the tensor it ends at (at the model's "
                "output: the search's objective).",
                "",
                "| stage | scales | ends at | objective start | objective final |",
                "|---|---|---|---|---|",
                *(
                    f"| {s['stage']} | {s['scales']} | {s['ends_at']} | {s['objective_start']:.5g} | "
                    f"{s['objective_final']:.5g} |"
                    for s in esc["stages"]
                ),
            ]
        if esc.get("history"):
            lines += ["", "![ESC convergence](convergence.png)"]
    if report["transforms"]:
        lines += ["", "## Transforms", "", "| node | transform | applied | detail |", "|---|---|---|---|"]
        lines += [
            f"| {t['node']} | {t['transform']} | {'yes' if t['applied'] else 'no'} | {t['detail']} |"
            for t in report["transforms"]
        ]
    lines += [
        "",
        "## Layers (SQNR of each op's output, quantized vs float, first held-out batch)",
        "",
        "| node | op | module | state | SQNR dB | why |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["layers"]:
        state = cfg["label"] if row["quantized"] else "float"
        lines.append(
            f"| {row['node']} | {row['op']} | {row['module']} | {state} | {_fmt(row['sqnr_db'])} | "
            f"{row['reason']} |"
        )
    lines += [
        "",
        "## Activation ranges",
        "",
        "| observer | min | max | threshold | clip ratio | scale |",
        "|---|---|---|---|---|---|",
    ]
    for a in report["activations"]:
        lines.append(
            f"| {a['label']} | {a['min']:.4g} | {a['max']:.4g} | {a['threshold']:.4g} | "
            f"{a['clip_ratio']:.3f} | {a['scale']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def _ethosu_lines(npu: dict[str, Any]) -> list[str]:
    """The NPU program: delegates with Vela's figures, what stays on the CPU and why, the
    TOSA reference model's check, and the same program on other accelerator sizes."""
    lines = [
        f"- Ethos-U program model.pte ({npu['target']}{', a16w8' if npu.get('a16w8') else ''}): "
        f"{npu['size_bytes'] / 1e3:.1f} kB; {npu['summary']}",
        "",
        "## Ethos-U delegates (Vela's estimate)",
        "",
        "| delegate | NPU ops | CPU ops | cycles | ms | SRAM KiB | flash KiB | DRAM KiB |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {d['index']} | {d['npu_ops']} | {d['cpu_ops']} | {d['cycles_total']} | {d['inference_ms']:.3f} | "
            f"{d['sram_kib']:.1f} | {d['flash_kib']:.1f} | {d['dram_kib']:.1f} |"
            for d in npu["delegates"]
        ),
        "",
        "Outside the delegates: "
        + (", ".join(f"{op} x{n}" for op, n in npu["cpu_ops"].items()) or "nothing")
        + " (the input's quantize and the output's dequantize run on the host by design).",
    ]
    if npu["rejected"]:
        lines += ["", "| op kept off the NPU | op | reason |", "|---|---|---|"]
        lines += [f"| {r['node']} | {r['op']} | {r['reason']} |" for r in npu["rejected"]]
    check = npu.get("check")
    if check:
        h = check["lsb_histogram"]
        lines += [
            "",
            f"TOSA reference model vs the converted graph: {h['0']} outputs equal, {h['1']} 1 LSB apart, "
            f"{h['2']} 2 LSB, {h['>2']} more (max {check['max_lsb']}); SQNR vs the graph "
            f"{check['tosa_vs_graph_db']:.1f} dB"
            + (f", vs float {check['tosa_vs_float_db']:.1f} dB" if check.get("tosa_vs_float_db") is not None else "")
            + f"; one run {check['milliseconds']:.0f} ms.",
        ]
    else:
        lines += ["", f"TOSA reference model: not run ({npu.get('check_skipped', '')})."]
    lines += [f"Note: {n}." for n in npu.get("notes", [])]
    if npu.get("sweep"):
        lines += [
            "",
            "Other accelerator sizes (Vela on the saved .tosa):",
            "",
            "| delegate | accelerator | cycles | ms | SRAM KiB | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in npu["sweep"]:
            if "error" in r:
                lines.append(f"| {r['delegate']} | {r['target']} | - | - | - | {r['error']} |")
            else:
                lines.append(
                    f"| {r['delegate']} | {r['target']} | {r['cycles_total']} | {r['inference_ms']:.3f} | "
                    f"{r['sram_kib']:.1f} | |"
                )
    return lines


def plot_convergence(history: list[dict[str, float]], start_objective: float, path: Path) -> None:
    """Best and mean objective per CMA-ES generation (log scale), and sigma, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in history]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ax.plot(gens, [h["best"] for h in history], label="best of generation")
    ax.plot(gens, [h["mean"] for h in history], label="mean of generation", alpha=0.7)
    ax.axhline(start_objective, color="grey", linestyle="--", label="start (local step)")
    ax.set_yscale("log")
    ax.set_ylabel("objective")
    ax.legend()
    ax2.plot(gens, [h["sigma"] for h in history], color="tab:green")
    ax2.set_ylabel("sigma")
    ax2.set_xlabel("generation")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
