"""Static int8 (QDQ) quantization of an ONNX export, calibrated on real inputs (``reverie.export.onnx``).

Calibration runs the fp32 export itself (``reverie.onnx_runtime.OnnxPipeline``) over ``n`` training captions
of the model's own dataset, two images each with the model's default sampler, steps and guidance, and
records every feed of every graph: the denoiser sees the states of real sampling trajectories at every grid
level, the text encoder real captions and phrases, the decoder the sampled latents. Ranges are MinMax over
all of them (activations uint8, asymmetric; weights int8, per output channel); the calibration graph reduces
each tensor to its min and max inside onnxruntime, so hundreds of feeds take little memory (not
``CalibMaxIntermediateOutputs``: in onnxruntime 1.32 it drops each full chunk of feeds unused).
``quant_pre_process`` (shape inference and graph optimization) runs first, as onnxruntime recommends. Only the
matrix products (Conv, MatMul, Gemm) are quantized: norms, softmax and the embedding lookup stay fp32 (QDQ on
MiniLM's embedding Gather fails in onnxruntime's quantizer). The layout graph (one small linear layer and a sum
of box masks) stays fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..build import DiffusionModel, build_dataset
from ..onnx_runtime import OnnxPipeline, session
from ..optional import require

QUANTIZED = ("denoiser", "text_encoder", "decoder")  # graphs that get an int8 version
IMAGES_PER_PROMPT = 2
OPS = ("Conv", "MatMul", "Gemm")  # the matrix products; norms, softmax, embedding lookups stay fp32


def calibration_prompts(model: DiffusionModel, n: int) -> list[str]:
    """``n`` captions of the model's training data (items 0..n-1 of its dataset); [""] for unconditional models."""
    if model.conditioning != "text":
        return [""] * n
    data = build_dataset(model.cfg)
    return [data[i]["text"] for i in range(n)]


def record_feeds(out_dir: Path, prompts: list[str], progress: bool = False) -> dict[str, list[dict]]:
    """Every feed of every graph while the fp32 export samples ``prompts`` (``IMAGES_PER_PROMPT`` each, seed =
    prompt index)."""
    from tqdm.auto import tqdm

    pipe = OnnxPipeline(out_dir, threads=1)
    feeds: dict[str, list[dict]] = {}
    pipe.on_run = lambda graph, feed: feeds.setdefault(graph, []).append(dict(feed))
    for k, prompt in enumerate(tqdm(prompts, desc="int8 calibration", disable=not progress)):
        pipe.sample([prompt], IMAGES_PER_PROMPT, seed=k)
    return feeds


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - only for calibrators that pass over the data twice
        raise NotImplementedError


def quantize_graph(src: Path, dst: Path, feeds: list[dict]) -> None:
    """Static QDQ int8 of ``src`` into ``dst``, calibrated on ``feeds``."""
    q = require("onnxruntime.quantization", "int8 quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + ".prep.onnx")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # its symbolic pass fails on Unsqueeze
        q.quantize_static(str(prepared), str(dst), _Reader(feeds), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax, op_types_to_quantize=list(OPS))
    finally:
        prepared.unlink(missing_ok=True)


def quantize_export(out_dir: Path, config: dict, model: DiffusionModel, n: int, report, progress: bool = False) -> dict:
    """Write ``*.int8.onnx`` for the export's quantizable graphs; returns the config's ``int8`` map and puts each
    graph's largest |int8 - fp32| on a recorded feed into ``report.int8_error``."""
    feeds = record_feeds(out_dir, calibration_prompts(model, n), progress=progress)
    int8 = {}
    for graph, file in config["graphs"].items():
        if graph not in QUANTIZED or graph not in feeds:
            continue
        dst = out_dir / file.replace(".onnx", ".int8.onnx")
        quantize_graph(out_dir / file, dst, feeds[graph])
        int8[graph] = dst.name
        probe = feeds[graph][len(feeds[graph]) // 2]
        fp32 = session(out_dir / file).run(None, probe)
        quantized = session(dst).run(None, probe)
        report.int8_error[graph] = max(float(np.abs(a - b).max()) for a, b in zip(fp32, quantized))
    return int8
