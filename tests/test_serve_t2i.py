"""`diffrt serve` over a latent text-to-image model (issue 7), against the real server.

uvicorn runs in a thread on 127.0.0.1 over the tiny exported text-to-image artifact (ONNX
Runtime, with its ControlNet), and httpx talks to it:

* a PNG over HTTP has the pixels `diffrt generate` writes for the same prompt, seed and settings;
* negative_prompt, control_image and controlnet_conditioning_scale reach the pipeline;
* fields for the other kind of model, or for a ControlNet the model lacks, are 422s naming the
  field, and the server keeps serving.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from diffrt.generate import GenerateRequest, generate  # noqa: E402
from diffrt.images import png_bytes  # noqa: E402
from diffrt.serve.app import BackgroundServer, ServeConfig  # noqa: E402
from diffrt.serve.schema import GenerateBody, RequestError  # noqa: E402

STEPS = 3
PROMPT = "a red square on a blue field"


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def control_png(tmp_path_factory):
    """A 32 x 32 control image: its file (for `diffrt generate`) and its base64 (for the service)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("control") / "edges.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path, base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def client(t2i_artifact):
    config = ServeConfig(model=str(t2i_artifact), backend="onnxruntime", port=0, api_key_env=None, max_batch_size=2,
                         max_queue=8, timeout_s=60, device="cpu", warmup_steps=1, log_level="warning")
    with BackgroundServer(config) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def served(client, **fields) -> np.ndarray:
    r = client.post("/v1/generate", json={"num_inference_steps": STEPS, **fields})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return pixels(r.content)


def generated(artifact, **fields) -> np.ndarray:
    req = GenerateRequest(model=str(artifact), backend="onnxruntime", num_inference_steps=STEPS, device="cpu", **fields)
    return pixels(png_bytes(generate(req).images[0]))


def test_ready_describes_a_text_to_image_model(client):
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["kind"] == "text-to-image" and ready["controlnet"] is True
    # What really runs each component (RELIABILITY #15): ONNX Runtime's providers in use, no CUDA graphs here.
    assert set(ready["providers"]) == {"text_encoder", "unet_controlnet", "vae_decoder"}
    assert all(used == ["CPUExecutionProvider"] for used in ready["providers"].values()) and ready["cuda_graph"] is False


def test_a_truncated_prompt_is_reported_in_the_answer(client):
    # RELIABILITY #13: the text cut off at the text encoder's 77 tokens reaches the client.
    long_prompt = " ".join(f"word{i}" for i in range(60))
    body = {"num_inference_steps": 1, "prompt": long_prompt, "seed": 1}
    r = client.post("/v1/generate", json=body, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["truncated"][0].replace(" ", "").endswith("word59") and answer["truncated_negative"] == [None]
    # Latency per stage: each component's calls, timed in place, are parts of the sampling time.
    timings = answer["timings_ms"]
    parts = [timings[name] for name in ("text_encoder", "unet_controlnet", "vae_decoder")]
    assert all(t > 0 for t in parts) and sum(parts) <= timings["sample"]
    assert 'diffrt_serve_stage_seconds_count{stage="unet_controlnet"}' in client.get("/metrics").text
    assert r.headers["x-diffrt-prompt-truncated"] == "true"
    png = client.post("/v1/generate", json=body)
    assert png.headers["content-type"] == "image/png" and png.headers["x-diffrt-prompt-truncated"] == "true"
    short = client.post("/v1/generate", json={**body, "prompt": PROMPT}, headers={"Accept": "application/json"})
    assert short.json()["truncated"] == [None] and "x-diffrt-prompt-truncated" not in short.headers


def test_http_pixels_equal_diffrt_generate(client, t2i_artifact):
    image = served(client, prompt=PROMPT, seed=3)
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3))
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=4))


def test_negative_prompt_reaches_the_pipeline(client, t2i_artifact):
    image = served(client, prompt=PROMPT, negative_prompt="blurry", seed=3)
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3))
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, negative_prompt="blurry", seed=3))


def test_control_image_and_scale_reach_the_controlnet(client, t2i_artifact, control_png):
    path, b64 = control_png
    image = served(client, prompt=PROMPT, seed=3, control_image=b64, controlnet_conditioning_scale=0.7)
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3))
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3, control_image=b64))  # scale 1.0
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3, control_image=str(path), control_scale=0.7))


@pytest.mark.parametrize("fields, field, words", [
    ({"prompt": PROMPT, "class_label": 1}, "class_label", "text-to-image"),
    ({"negative_prompt": "blurry"}, "prompt", "required"),
    ({"prompt": PROMPT, "lora_scale": 0.5}, "lora_scale", "export"),
    ({"prompt": PROMPT, "control_image": "not base64!"}, "control_image", "base64"),
    ({"prompt": PROMPT, "control_image": base64.b64encode(b"not a png").decode()}, "control_image", "not a readable image"),
    ({"prompt": PROMPT, "controlnet_conditioning_scale": 0.5}, "controlnet_conditioning_scale", "control_image"),
    ({"prompt": PROMPT, "height": 40}, "height", "multiple of"),
])
def test_wrong_fields_are_422s_naming_the_field_and_serving_goes_on(client, fields, field, words):
    r = client.post("/v1/generate", json={"num_inference_steps": STEPS, **fields})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["detail"]
    served(client, prompt=PROMPT, seed=1)


def test_control_fields_need_a_controlnet(t2i_folder):
    """A diffusers folder opened without `--controlnet DIR` has no ControlNet: control fields are refused."""
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    worker = make_worker(RuntimeConfig(model=str(t2i_folder), backend="torch", device="cpu", warmup_steps=1))
    worker.load()
    assert worker.describe()["controlnet"] is False
    for name, value in (("control_image", "aGVsbG8="), ("controlnet_conditioning_scale", 0.5)):
        with pytest.raises(RequestError) as info:
            worker.plan(GenerateBody(prompt=PROMPT, **{name: value}))
        assert info.value.status == 422 and info.value.field == name and "--controlnet" in info.value.message


def test_several_controlnets_take_one_image_and_scale_each(t2i_multi_artifact, control_png, tmp_path):
    """An artifact with two ControlNets: a list of images and of scales, in the ControlNets' order,
    gives what `diffrt generate` gives; wrong counts are 422s naming the field."""
    from PIL import Image

    path_a, b64_a = control_png
    path_b = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path_b)
    b64_b = base64.b64encode(path_b.read_bytes()).decode("ascii")
    config = ServeConfig(model=str(t2i_multi_artifact), backend="onnxruntime", port=0, api_key_env=None, device="cpu",
                         warmup_steps=1, log_level="warning")
    with BackgroundServer(config) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        assert client.get("/readyz").json()["controlnets"] == 2
        image = served(client, prompt=PROMPT, seed=2, control_image=[b64_a, b64_b], controlnet_conditioning_scale=[0.5, 1.5])
        want = generated(t2i_multi_artifact, prompt=PROMPT, seed=2, control_image=[str(path_a), str(path_b)],
                         control_scale=[0.5, 1.5])
        np.testing.assert_array_equal(image, want)
        swapped = served(client, prompt=PROMPT, seed=2, control_image=[b64_a, b64_b], controlnet_conditioning_scale=[1.5, 0.5])
        assert not np.array_equal(image, swapped)
        for fields, field in (({"control_image": b64_a}, "control_image"),
                              ({"control_image": [b64_a, b64_b], "controlnet_conditioning_scale": [0.5]},
                               "controlnet_conditioning_scale")):
            r = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": STEPS, **fields})
            assert r.status_code == 422 and r.json()["field"] == field, r.text
