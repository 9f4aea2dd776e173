"""Triton's own gRPC client (tritonclient.grpc) against a running tritonserver, for tests/test_triton.py.

    python triton_grpc_client.py SIDE_FOLDER PLAN.json OUT_DIR

tritonclient[grpc] needs protobuf 6 and the venv holds 7, so `make tritonclient` installs it in a
side folder (.venv/tritonserver/grpcclient) and this script puts that folder first on sys.path
before anything imports google.protobuf. The venv's grpcio and numpy serve as they are; diffrt
is not imported: this is what a user's client process sees.

PLAN.json: {"url": "127.0.0.1:PORT", "models": [names], "requests": {key: {"model": name,
"inputs": [{"name", "datatype", "shape", "data"}]}}, "abandon": optional, see abandon()}, BYTES
data as base64 strings. Written to
OUT_DIR: results.json (health, readiness, metadata and config per model, and per request either
its outputs or its error) and KEY.OUTPUT.npy for each numeric output.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1])  # protobuf 6 before the venv's 7: nothing has imported it yet

import google.protobuf  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


def tensor(spec: dict) -> grpcclient.InferInput:
    if spec["datatype"] == "BYTES":
        array = np.array([base64.b64decode(v) for v in spec["data"]], dtype=object)
    else:
        array = np.array(spec["data"], dtype={"INT64": np.int64, "FP64": np.float64, "FP32": np.float32}[spec["datatype"]])
    array = array.reshape(spec["shape"])
    data = grpcclient.InferInput(spec["name"], list(array.shape), spec["datatype"])
    data.set_data_from_numpy(array)
    return data


def abandon(client, plan: dict) -> dict:
    """Requests whose gRPC deadline passes while they wait: how long a request sent after them
    takes, beside one request like them alone (their rows should not be generated for nobody)."""
    import threading

    start = time.monotonic()
    client.infer(plan["model"], [tensor(spec) for spec in plan["alone"]], client_timeout=300)
    alone_s = time.monotonic() - start
    statuses, done = [], threading.Event()

    def callback(result, error):
        statuses.append(None if error is None else error.status())
        if len(statuses) == len(plan["abandoned"]):
            done.set()

    for inputs in plan["abandoned"]:
        client.async_infer(plan["model"], [tensor(spec) for spec in inputs], callback, client_timeout=plan["client_timeout"])
    done.wait(60)
    time.sleep(plan["client_timeout"])
    start = time.monotonic()
    client.infer(plan["model"], [tensor(spec) for spec in plan["after"]], client_timeout=300)
    return {"alone_s": alone_s, "after_s": time.monotonic() - start, "statuses": statuses}


def main() -> None:
    plan = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])
    client = grpcclient.InferenceServerClient(plan["url"])
    results: dict = {
        "protobuf": google.protobuf.__version__,
        "protobuf_file": google.protobuf.__file__,
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": {m: client.is_model_ready(m) for m in plan["models"]},
        "metadata": {m: client.get_model_metadata(m, as_json=True) for m in plan["models"]},
        "config": {m: client.get_model_config(m, as_json=True)["config"] for m in plan["models"]},
        "requests": {},
    }
    for key, request in plan["requests"].items():
        try:
            result = client.infer(request["model"], [tensor(spec) for spec in request["inputs"]], client_timeout=300)
        except InferenceServerException as exc:
            results["requests"][key] = {"error": exc.message(), "status": exc.status()}
            continue
        answer = {}
        for output in result.get_response(as_json=True)["outputs"]:
            name, array = output["name"], result.as_numpy(output["name"])
            if output["datatype"] == "BYTES":
                answer[name] = {"datatype": "BYTES", "shape": list(array.shape),
                                "data": [bytes(v).decode("utf-8") for v in array.reshape(-1)]}
            else:
                np.save(out / f"{key}.{name}.npy", array)
                answer[name] = {"datatype": output["datatype"], "shape": list(array.shape), "file": f"{key}.{name}.npy"}
        results["requests"][key] = {"outputs": answer}
    if "abandon" in plan:
        results["abandon"] = abandon(client, plan["abandon"])
    client.close()
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
