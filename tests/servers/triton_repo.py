"""A model repository for the real Triton Inference Server (tests/test_triton_e2e.py).

One model, ``tiny``: Triton's Python backend, decoupled (one request, any number of
responses, as Triton's LLM backends stream). It answers ``text_input`` with ``max_tokens``
responses of one ``text_output`` word each, ``interval_ms`` apart, and stops early when
Triton reports the request cancelled. A request whose text is ``fail`` gets an error
response; one whose text starts ``fail-after-`` gets its tokens, then an error response. For each request it appends one JSON line to the timings file: its text, when
``execute`` took it and when it handed each response to Triton (CLOCK_REALTIME, ns), so
that the agent's timings can be held to the model's.

The backend's stub runs the model in its own Python, which sees neither the test's
environment nor its variables: ``numpy_dir`` (numpy<2, scripts/setup.sh) is put on its
path by the model itself."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = """\
name: "tiny"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "interval_ms" data_type: TYPE_INT32 dims: [ 1 ] optional: true }
]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

MODEL = """\
import json
import sys
import time

sys.path.insert(0, {numpy_dir})
import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

TIMINGS = {timings}


def _int(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else int(t.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            t_exec = time.time_ns()
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            text = text.decode() if isinstance(text, bytes) else str(text)
            n = _int(request, "max_tokens", 8)
            interval = _int(request, "interval_ms", 0) / 1e3
            sends = []
            fail = text == "fail"
            for i in range(0 if fail else n):
                if i and interval:
                    time.sleep(interval)
                if request.is_cancelled():
                    break
                out = pb_utils.Tensor("text_output", np.array([("tok-%d-zq " % i).encode()], dtype=np.object_))
                sends.append(time.time_ns())
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            if fail or text.startswith("fail-after-"):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("the model refused")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            with open(TIMINGS, "a") as f:
                f.write(json.dumps({{"text": text, "t_exec": t_exec, "sends": sends}}) + "\\n")
        return None
"""


ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO = """\
import sys

sys.path.insert(0, {numpy_dir})
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                    "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() * 2)])
                for r in requests]
"""


def write_repository(root: Path, numpy_dir: Path, timings: Path) -> Path:
    """Write the repository under ``root`` (``tiny``, and ``echo``: one response per request,
    its INT32 tensor doubled, for the KServe v2 ``infer`` calls); returns its path."""
    numpy = json.dumps(str(numpy_dir))
    for name, config, code in (("tiny", CONFIG, MODEL.format(numpy_dir=numpy, timings=json.dumps(str(timings)))),
                               ("echo", ECHO_CONFIG, ECHO.format(numpy_dir=numpy))):
        model = root / name
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(config)
        (model / "1" / "model.py").write_text(code)
    return root
