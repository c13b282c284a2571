"""ONNX Runtime as predict's CPU backend (`--backend onnxruntime`, `pip install ikdmil[onnx]`).

Why: on the 2-core development CPU, ONNX Runtime ran the VGG16-MIL fused map 1.65x faster than
PyTorch eager (channels-last fp32) at 256 px x 4 and 1.5x at 1024 px, with outputs equal to 1e-7
(`benchmarks/backends.py`). The model is exported once per tile size (the grid fixes it per slide),
from a copy of the module each time (a second export of one module in a process was measured to
give a wrong graph), to an in-memory ONNX graph with a dynamic batch axis. Only the fused map is
exported: smoothing and stitching stay in PyTorch, shared with the torch backend.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import warnings

import torch

from ikdmil.errors import IkdmilError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
_EXPORT_LOCK = threading.Lock()  # the exporter traces through global state: two threads exporting at once break


class FusedMap(torch.nn.Module):
    """uint8 (B,3,H,W) -> fused probability map (B,1,H,W) float32: what predict stitches."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).fused.float()


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """torch or onnxruntime. auto: ONNX Runtime on CPU when it is installed (measured faster), else torch."""
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise IkdmilError(f"--backend onnxruntime runs on the CPU, but --device is {device}; use --device cpu "
                              "or --backend torch")
        if not onnxruntime_available():
            raise IkdmilError("--backend onnxruntime: ONNX Runtime is not installed; pip install 'ikdmil[onnx]' "
                              "(or use --backend torch)")
    return backend


class OnnxFused:
    """The fused map of a model through ONNX Runtime, one session per tile size."""

    def __init__(self, model: torch.nn.Module, threads: int | None = None):
        self.model = model
        self.threads = threads or torch.get_num_threads()
        self.sessions: dict[tuple[int, int], object] = {}

    def _session(self, x: torch.Tensor):
        import onnxruntime as ort

        key = tuple(x.shape[-2:])
        if key not in self.sessions:
            buf = io.BytesIO()
            with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracer's notes on Python loops over the side maps
                torch.onnx.export(FusedMap(copy.deepcopy(self.model)).eval(), (x[:1],), buf, input_names=["tiles"],
                                  output_names=["fused"], dynamic_axes={"tiles": {0: "batch"}, "fused": {0: "batch"}},
                                  dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            self.sessions[key] = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
            logger.debug("onnxruntime: exported the model for %dx%d px tiles", *key)
        return self.sessions[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) float32 on the CPU for a uint8 (B,3,H,W) batch."""
        x = x.cpu().contiguous()
        out = self._session(x).run(None, {"tiles": x.numpy()})[0]
        return torch.from_numpy(out)
