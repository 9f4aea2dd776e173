"""`diffrt serve` over a latent text-to-image model (issue 7), against the real server.

uvicorn runs in a thread on 127.0.0.1 over the tiny exported text-to-image artifact (ONNX
Runtime, with its ControlNet), and httpx talks to it:

* a PNG over HTTP has the pixels `diffrt generate` writes for the same prompt, seed and settings;
* negative_prompt, control_image, controlnet_conditioning_scale and control_guidance_start/end reach the pipeline;
* fields for the other kind of model, or for a ControlNet the model lacks, are 422s naming the
  field, and the server keeps serving;
* requests that differ only in prompt, negative prompt, seed and num_images (and, with control
  images of one size and equal scales, control image; with equal eta > 0, each its own per-step
  noise) share batches, and each answer (images, truncated prompt) is the one that request gets
  alone (RELIABILITY #18); colour-guided requests run alone.
  ONNX Runtime's CPU kernels are batch-invariant on the tiny model: the start-up probe measures
  batched == alone bit for bit, so "the same" here means the same PNG pixels.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import serving  # noqa: E402
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
def server(t2i_artifact):
    config = ServeConfig(model=str(t2i_artifact), backend="onnxruntime", port=0, api_key_env=None, max_batch_size=2,
                         max_queue=8, timeout_s=60, device="cpu", warmup_steps=1, log_level="warning")
    with BackgroundServer(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def served(client, **fields) -> np.ndarray:
    r = client.post("/v1/generate", json={"num_inference_steps": STEPS, **fields})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return pixels(r.content)


def generated(artifact, **fields) -> np.ndarray:
    return generated_images(artifact, **fields)[0]


def generated_images(artifact, **fields) -> list[np.ndarray]:
    req = GenerateRequest(model=str(artifact), backend="onnxruntime", num_inference_steps=STEPS, device="cpu", **fields)
    return [pixels(png_bytes(image)) for image in generate(req).images]


def answer_pixels(answer: dict) -> list[np.ndarray]:
    return [pixels(base64.b64decode(image["png_base64"])) for image in answer["images"]]


def queued_together(server, client, bodies: list[dict]) -> list[httpx.Response]:
    return serving.queued_together(server, client, bodies, blocker={"prompt": PROMPT, "seed": 0}, steps=STEPS)


def test_ready_describes_a_text_to_image_model(client):
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["kind"] == "text-to-image" and ready["controlnet"] is True
    # What really runs each component (RELIABILITY #15): ONNX Runtime's providers in use, no CUDA graphs here.
    assert set(ready["providers"]) == {"text_encoder", "unet_controlnet", "vae_decoder", "vae_encoder"}  # exported with --vae-encoder
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
    negative = client.post("/v1/generate", json={**body, "prompt": PROMPT, "negative_prompt": long_prompt},
                           headers={"Accept": "application/json"})
    assert negative.json()["truncated"] == [None] and negative.json()["truncated_negative"][0].replace(" ", "").endswith("word59")
    assert negative.headers["x-diffrt-prompt-truncated"] == "true"


def test_http_pixels_equal_diffrt_generate(client, t2i_artifact):
    image = served(client, prompt=PROMPT, seed=3)
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3))
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=4))


def test_guidance_rescale_reaches_the_pipeline(client, t2i_artifact):
    image = served(client, prompt=PROMPT, seed=3, guidance_scale=9.0, guidance_rescale=0.7)
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3, guidance_scale=9.0))
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3, guidance_scale=9.0, guidance_rescale=0.7))


def test_clip_skip_reaches_the_text_encoder(client, t2i_artifact):
    image = served(client, prompt=PROMPT, seed=3, clip_skip=1)
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3))
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3, clip_skip=1))


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


def test_control_guidance_start_and_end_reach_the_controlnet(client, t2i_artifact, control_png):
    path, b64 = control_png
    window = dict(control_guidance_start=0.3, control_guidance_end=0.7)
    image = served(client, prompt=PROMPT, seed=3, control_image=b64, **window)
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3, control_image=b64))
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3, control_image=str(path), **window))


def test_guess_mode_reaches_the_controlnet(client, t2i_artifact, control_png):
    path, b64 = control_png
    image = served(client, prompt=PROMPT, seed=3, control_image=b64, guess_mode=True)
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=3, control_image=b64))
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=3, control_image=str(path), guess_mode=True))


def test_image_to_image_equals_diffrt_generate(client, t2i_artifact, control_png, tmp_path):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    b64 = base64.b64encode(init.read_bytes()).decode("ascii")
    image = served(client, prompt=PROMPT, seed=5, image=b64, strength=0.6)
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=5, image=str(init), strength=0.6))
    assert not np.array_equal(image, served(client, prompt=PROMPT, seed=5))
    # With a control image too, at diffusers' ControlNet img2img default scale (0.8): `diffrt generate`'s.
    path, control = control_png
    image = served(client, prompt=PROMPT, seed=5, image=b64, control_image=control)
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=5, image=str(init), control_image=str(path)))
    # An image whose sides are not multiples of 8 is taken at its size rounded down, as `diffrt generate` (and diffusers) take it.
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (36, 38, 3), dtype=np.uint8)).save(odd)
    image = served(client, prompt=PROMPT, seed=5, image=base64.b64encode(odd.read_bytes()).decode("ascii"), strength=0.6)
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, generated(t2i_artifact, prompt=PROMPT, seed=5, image=str(odd), strength=0.6))


def _truncated_png() -> bytes:
    """A PNG whose header chunk is cut short: Pillow raises ValueError for it, not OSError."""
    import struct
    import zlib

    body = b"IHDR" + b"\x00\x00\x00\x08\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 6) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


TRUNCATED_PNG = _truncated_png()


def _png_base64(side: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _icon_base64(side: int) -> str:
    """An ICO: Pillow's plugin decodes the PNG it embeds while opening, before a size can be checked (a security
    review's 560 KB icon held 12000 x 12000 pixels); a service takes PNG, JPEG and WebP only."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="ICO", sizes=[(side, side)])
    return base64.b64encode(buf.getvalue()).decode("ascii")


PNGS = {"SMALL_PNG": _png_base64(32), "OTHER_PNG": _png_base64(40), "ICON": _icon_base64(32)}  # placeholders below


@pytest.mark.parametrize("fields, field, words", [
    ({"prompt": PROMPT, "class_label": 1}, "class_label", "text-to-image"),
    ({"negative_prompt": "blurry"}, "prompt", "required"),
    ({"prompt": PROMPT, "lora_scale": 0.5}, "lora_scale", "runs no LoRA; open a diffusers folder with --lora"),
    ({"prompt": PROMPT, "control_image": "not base64!"}, "control_image", "base64"),
    ({"prompt": PROMPT, "control_image": base64.b64encode(b"not a png").decode()}, "control_image", "not a readable image"),
    ({"prompt": PROMPT, "controlnet_conditioning_scale": 0.5}, "controlnet_conditioning_scale", "control_image"),
    ({"prompt": PROMPT, "control_guidance_end": 0.5}, "control_guidance_end", "needs control_image"),
    ({"prompt": PROMPT, "guess_mode": True}, "guess_mode", "needs control_image"),
    ({"prompt": PROMPT, "clip_skip": 2}, "clip_skip", "below the text encoder's 2 layers"),
    ({"prompt": PROMPT, "control_image": "SMALL_PNG", "control_guidance_start": 0.6, "control_guidance_end": 0.4},
     "control_guidance_start", "must start before it ends"),
    ({"prompt": PROMPT, "control_image": "SMALL_PNG", "control_guidance_end": 1.5}, "control_guidance_end", "less than or equal to 1"),
    ({"prompt": PROMPT, "control_image": "SMALL_PNG", "control_guidance_start": 0.2, "control_guidance_end": [0.5, 0.6]},
     "control_guidance_end", "have 2 values for 1 ControlNet"),
    ({"prompt": PROMPT, "height": 40}, "height", "multiple of"),
    ({"prompt": PROMPT, "num_images": 3}, "num_images", "largest batch (2)"),
    ({"prompt": PROMPT, "control_image": base64.b64encode(TRUNCATED_PNG).decode()}, "control_image", "not a readable image"),
    ({"prompt": PROMPT, "strength": 0.5}, "strength", "needs image"),
    ({"prompt": PROMPT, "image": base64.b64encode(b"not a png").decode()}, "image", "not a readable image"),
    ({"prompt": PROMPT, "control_image": "ICON"}, "control_image", "not a readable image"),
    ({"prompt": PROMPT, "image": "SMALL_PNG", "strength": 0.1}, "strength", "leaves no denoising step"),
    ({"prompt": PROMPT, "image": "SMALL_PNG", "control_image": "OTHER_PNG"}, "image", "but control_image"),
    ({"prompt": PROMPT, "scheduler": "heun"}, "scheduler", "Input should be 'ddim', 'lcm', 'dpm', 'euler' or 'euler_a'"),
    ({"prompt": PROMPT, "scheduler": "lcm", "num_inference_steps": 60}, "num_inference_steps", "LCM takes its steps from the 50"),
    ({"prompt": PROMPT, "scheduler": "lcm", "eta": 0.5}, "eta", "eta 0.5 is DDIM's; LCM draws fresh noise"),
    ({"prompt": PROMPT, "scheduler": "lcm", "image": "SMALL_PNG", "strength": 0.2}, "strength", "leaves no denoising step"),
    ({"prompt": PROMPT, "color_scale": 5.0}, "color_scale", "no color was given"),  # unguided images, no word of why
])
def test_wrong_fields_are_422s_naming_the_field_and_serving_goes_on(client, fields, field, words):
    fields = {key: PNGS.get(value, value) if isinstance(value, str) else value for key, value in fields.items()}
    r = client.post("/v1/generate", json={"num_inference_steps": STEPS, **fields})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["detail"]
    served(client, prompt=PROMPT, seed=1)


def test_an_image_over_the_image_limit_is_a_413_naming_it(client):
    for field in ("image", "control_image"):  # 9 MiB decoded: under the body limit, over the image limit (8 MiB)
        r = client.post("/v1/generate", json={"prompt": PROMPT, field: "A" * (12 << 20)})
        assert r.status_code == 413 and r.json()["field"] == field and "the limit is 8.0 MiB" in r.json()["detail"], r.text


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


# -- dynamic batching ---------------------------------------------------------------------------

LONG_PROMPT = " ".join(f"word{i}" for i in range(60))


def test_requests_share_batches_and_each_gets_its_own_image(server, client, t2i_artifact):
    ready = client.get("/readyz").json()
    assert ready["batch_max_abs_diff"] == 0.0 and ready["batches_requests"] is True  # ONNX Runtime CPU: bitwise batch-invariant
    assert server.runtime.worker.max_batch_size == 2  # the engines take batch 4: 2 images x 2 for guidance
    bodies = [{"prompt": f"{PROMPT}, number {i}", "seed": 20 + i} for i in range(3)]
    bodies += [{"prompt": LONG_PROMPT, "seed": 30}, {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 31},
               {"prompt": PROMPT, "seed": 32}]
    responses = queued_together(server, client, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["batch_size"] for a in answers] == [2] * 6  # six queued requests, three full batches
    assert all(r.headers["x-diffrt-batch-size"] == "2" for r in responses)
    assert len({a["id"] for a in answers}) == 6
    for body, answer in zip(bodies, answers):
        assert answer["seed"] == body["seed"]
        np.testing.assert_array_equal(answer_pixels(answer)[0], generated(t2i_artifact, **body), err_msg=str(body))
    # RELIABILITY #13 in a shared batch: the cut-off text goes to the long prompt's request only.
    for body, answer, r in zip(bodies, answers, responses):
        if body["prompt"] == LONG_PROMPT:
            assert answer["truncated"][0].replace(" ", "").endswith("word59") and answer["truncated_negative"] == [None]
            assert r.headers["x-diffrt-prompt-truncated"] == "true"
        else:
            assert answer["truncated"] == [None] and "x-diffrt-prompt-truncated" not in r.headers
    assert all(0 < a["timings_ms"]["unet_controlnet"] <= a["timings_ms"]["sample"] for a in answers)  # per-stage timings still in place


def test_eta_requests_share_batches_and_each_gets_its_own_image(server, client, t2i_artifact):
    """eta > 0: requests at equal eta share a batch, each drawing its rows of the per-step noise from
    its own seed's generator; eta 0 and another eta run apart."""
    bodies = [{"prompt": PROMPT, "seed": 60, "eta": 0.5}, {"prompt": PROMPT, "seed": 61},
              {"prompt": f"{PROMPT}, again", "seed": 62, "eta": 0.5}, {"prompt": PROMPT, "seed": 60, "eta": 1.0}]
    responses = queued_together(server, client, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["batch_size"] for a in answers] == [2, 1, 2, 1]
    images = [answer_pixels(answer)[0] for answer in answers]
    for body, image in zip(bodies, images):
        np.testing.assert_array_equal(image, generated(t2i_artifact, **body), err_msg=str(body))
    assert not np.array_equal(images[0], images[3])  # eta reached the sampler


def test_scheduler_per_request_is_diffrt_generate_scheduler_and_never_shares_a_batch(server, client, t2i_artifact, tmp_path):
    """`scheduler: "lcm"` samples this DDIM artifact with LCM (guidance 1.0 by default, as `diffrt generate
    --scheduler lcm`); at equal settings otherwise, LCM and DDIM requests run apart, and each request, batched
    or not, gets the images `diffrt generate` writes for it."""
    from diffrt.cli import main

    out = tmp_path / "lcm.png"
    assert main(["generate", "--model", str(t2i_artifact), "--backend", "onnxruntime", "--device", "cpu", "--prompt", PROMPT,
                 "--seed", "74", "--steps", str(STEPS), "--scheduler", "lcm", "--out", str(out)]) == 0
    lcm = served(client, prompt=PROMPT, seed=74, scheduler="lcm")
    np.testing.assert_array_equal(lcm, pixels(out.read_bytes()))
    assert not np.array_equal(lcm, served(client, prompt=PROMPT, seed=74, guidance_scale=1.0))  # DDIM, the model's own

    bodies = [{"prompt": PROMPT, "seed": 75, "scheduler": "lcm", "guidance_scale": 1.5},
              {"prompt": PROMPT, "seed": 76, "guidance_scale": 1.5},
              {"prompt": f"{PROMPT}, again", "seed": 77, "scheduler": "ddim", "guidance_scale": 1.5}]
    responses = queued_together(server, client, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["batch_size"] for a in answers] == [1, 2, 2]  # LCM alone; the model's own (DDIM) with "ddim", one sampler
    for body, answer in zip(bodies, answers):
        np.testing.assert_array_equal(answer_pixels(answer)[0], generated(t2i_artifact, **body), err_msg=str(body))


def test_a_control_image_request_never_shares_with_plain_ones(server, client, t2i_artifact, control_png):
    path, b64 = control_png
    bodies = [{"prompt": PROMPT, "seed": 40}, {"prompt": PROMPT, "seed": 41, "control_image": b64, "controlnet_conditioning_scale": 0.7},
              {"prompt": "another prompt", "seed": 42}]
    responses = queued_together(server, client, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["batch_size"] for a in answers] == [2, 1, 2]  # the plain requests pair up around it
    np.testing.assert_array_equal(answer_pixels(answers[1])[0],
                                  generated(t2i_artifact, prompt=PROMPT, seed=41, control_image=str(path), control_scale=0.7))
    for i in (0, 2):
        np.testing.assert_array_equal(answer_pixels(answers[i])[0], generated(t2i_artifact, **bodies[i]))


def test_controlnet_requests_with_equal_scales_share_a_batch(server, client, t2i_artifact, control_png, tmp_path):
    """Control images of one size and equal scales share a batch, one control row per image, and
    each answer is that request's `diffrt generate --control-image`; another scale runs apart."""
    from PIL import Image

    paths = [control_png[0]]
    for i in (1, 2):
        paths.append(tmp_path / f"edges{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    b64s = [base64.b64encode(path.read_bytes()).decode("ascii") for path in paths]
    bodies = [{"prompt": f"{PROMPT}, edges {i}", "seed": 50 + i, "control_image": b64s[i], "controlnet_conditioning_scale": scale}
              for i, scale in enumerate((0.7, 1.3, 0.7))]
    responses = queued_together(server, client, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["batch_size"] for a in answers] == [2, 1, 2]  # the 0.7s pair up; 1.3 would have joined the first otherwise
    assert [r.headers["x-diffrt-batch-size"] for r in responses] == ["2", "1", "2"]
    for body, path, answer in zip(bodies, paths, answers):
        want = generated(t2i_artifact, prompt=body["prompt"], seed=body["seed"], control_image=str(path),
                         control_scale=body["controlnet_conditioning_scale"])
        np.testing.assert_array_equal(answer_pixels(answer)[0], want, err_msg=str(path))


def test_requests_with_different_num_images_share_a_batch(t2i_artifact, control_png):
    """One prompt row per image: 1 + 2 images from two requests in one batch (no guidance, so the
    engines' batch 4 takes 3 images), each request's images are its own `diffrt generate --num-images`."""
    from diffrt.serve.batcher import Job
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    worker = make_worker(RuntimeConfig(model=str(t2i_artifact), backend="onnxruntime", device="cpu", warmup_steps=1))
    worker.load()
    bodies = [GenerateBody(prompt=LONG_PROMPT, seed=5, num_inference_steps=STEPS, guidance_scale=1.0),
              GenerateBody(prompt="another prompt", seed=6, num_images=2, num_inference_steps=STEPS, guidance_scale=1.0)]
    plans = [worker.plan(body) for body in bodies]
    assert worker.batch_key(plans[0]) == worker.batch_key(plans[1]) is not None
    jobs = [Job(worker.batch_key(plan), plan.num_images, plan, deadline=time.monotonic() + 60) for plan in plans]
    answers = worker.run_batch(jobs[::-1])  # the batch's order is not the answers' order: ids match them
    for job, body in zip(jobs, bodies):
        answer = answers[job.id]
        assert answer.batch_size == 3 and answer.seed == body.seed and len(answer.images) == body.num_images
        want = generated_images(t2i_artifact, prompt=body.prompt, seed=body.seed, num_images=body.num_images, guidance_scale=1.0)
        for png, image in zip(answer.images, want):
            np.testing.assert_array_equal(pixels(png), image)
    assert answers[jobs[0].id].truncated["truncated"][0].replace(" ", "").endswith("word59")
    assert answers[jobs[1].id].truncated == {"truncated": [None], "truncated_negative": None}  # no guidance: no negative prompt

    # eta > 0 too: each request's rows of every step's noise come from its own seed's generator.
    bodies = [GenerateBody(prompt=PROMPT, seed=7, num_images=2, eta=0.5, num_inference_steps=STEPS, guidance_scale=1.0),
              GenerateBody(prompt="another prompt", seed=8, eta=0.5, num_inference_steps=STEPS, guidance_scale=1.0)]
    plans = [worker.plan(body) for body in bodies]
    assert worker.batch_key(plans[0]) == worker.batch_key(plans[1]) is not None
    jobs = [Job(worker.batch_key(plan), plan.num_images, plan, deadline=time.monotonic() + 60) for plan in plans]
    answers = worker.run_batch(jobs)
    for job, body in zip(jobs, bodies):
        assert answers[job.id].batch_size == 3
        want = generated_images(t2i_artifact, prompt=body.prompt, seed=body.seed, num_images=body.num_images, eta=0.5,
                                guidance_scale=1.0)
        for png, image in zip(answers[job.id].images, want, strict=True):
            np.testing.assert_array_equal(pixels(png), image)

    def key(**fields):
        return worker.batch_key(worker.plan(GenerateBody(**{"prompt": PROMPT, **fields})))

    assert key(eta=0.5) is not None and key(eta=0.5) == key(eta=0.5, seed=3) != key(eta=0.3) != key()
    assert key(color="#ff0000") is None  # colour guidance runs alone: the PyTorch VAE is not batch-invariant
    # A control image shares only with control images of its size and its scale, never with plain requests.

    b64 = control_png[1]
    assert key(control_image=b64) is not None and key(control_image=b64) != key()
    assert key(control_image=b64, seed=1) == key(control_image=b64, controlnet_conditioning_scale=1.0, prompt="other")
    assert key(control_image=b64, controlnet_conditioning_scale=0.5) != key(control_image=b64)
    assert key(control_image=b64, control_guidance_end=0.5) == key(control_image=b64, control_guidance_end=0.5, seed=2)
    assert key(control_image=b64, control_guidance_end=0.5) != key(control_image=b64)


def test_lora_scale_per_request_equals_generate_at_that_scale(t2i_folder, tmp_path):
    """`diffrt serve --lora FILE:0.8` on PyTorch: a request's lora_scale multiplies 0.8, so its image
    is `diffrt generate --lora FILE:0.8*lora_scale`; scales never share a batch, and going back to
    1.0 after 0.5 gives the LoRA as opened (refits from the base, never accumulating)."""
    from diffrt.serve.batcher import Job
    from diffrt.serve.runtime import RuntimeConfig, make_worker
    from diffrt.tiny import tiny_lora_files

    lora = str(tiny_lora_files(t2i_folder, tmp_path / "lora", seed=3)["peft"])
    worker = make_worker(RuntimeConfig(model=str(t2i_folder), backend="torch", device="cpu", warmup_steps=1, loras=[(lora, 0.8)]))
    worker.load()
    assert worker.describe()["lora_scale"] == 1.0
    bodies = [GenerateBody(prompt=PROMPT, seed=4, num_inference_steps=STEPS, lora_scale=scale) for scale in (0.5, None, 0.5, 0.0, 0.0)]
    plans = [worker.plan(body) for body in bodies]
    assert plans[0].batch_key() == plans[2].batch_key() != plans[1].batch_key()
    images, switched = [], []
    for plan in plans:
        job = Job(worker.batch_key(plan), plan.num_images, plan, deadline=time.monotonic() + 60)
        answer = worker.run_batch([job])[job.id]
        images.append(pixels(answer.images[0]))
        switched.append("lora_scale" in answer.timings_ms)  # the re-fuse is a stage of its own, when it happens
    assert switched == [True, True, True, True, False]
    for image, scale in zip(images, (0.4, 0.8, 0.4, 0.0, 0.0)):
        req = GenerateRequest(model=str(t2i_folder), backend="torch", device="cpu", prompt=PROMPT, seed=4,
                              num_inference_steps=STEPS, loras=[(lora, scale)])
        np.testing.assert_array_equal(image, pixels(png_bytes(generate(req).images[0])), err_msg=f"LoRA at {scale}")
    assert not np.array_equal(images[0], images[1])


def test_gradio_demo_takes_a_prompt_and_a_control_image(server, control_png, tmp_path):
    """The demo over a text-to-image ControlNet model: prompt, negative prompt and the Canny edges of
    an uploaded picture all reach the request; the image is the service's answer to it."""
    from PIL import Image

    from diffrt.serve.ui import build_ui, canny_edges, display, make_generate, png_base64

    assert build_ui(server.runtime) is not None
    picture = np.asarray(Image.open(control_png[0]).convert("RGB"))
    generate = make_generate(server.runtime)
    image, latency = generate(None, PROMPT, "blurry", STEPS, 5.0, False, "#000000", 0.0, 3, picture)
    assert "ms" in latency and "onnxruntime" in latency

    def answer(**fields) -> np.ndarray:
        body = GenerateBody(num_inference_steps=STEPS, guidance_scale=5.0, seed=3, **fields)
        return np.asarray(display(Image.open(io.BytesIO(server.runtime.generate_sync(body).images[0]))))

    edges = png_base64(canny_edges(picture))
    np.testing.assert_array_equal(np.asarray(image), answer(prompt=PROMPT, negative_prompt="blurry", control_image=edges))
    assert not np.array_equal(np.asarray(image), answer(prompt=PROMPT, negative_prompt="blurry"))
    assert not np.array_equal(np.asarray(image), answer(prompt="another prompt", negative_prompt="blurry", control_image=edges))

    # Image-to-image: the picture to start from and its strength reach the request too.
    image, _ = generate(None, PROMPT, None, STEPS, 5.0, False, "#000000", 0.0, 3, None, init_image=picture, strength=0.5)
    np.testing.assert_array_equal(np.asarray(image), answer(prompt=PROMPT, image=png_base64(picture), strength=0.5))
    assert not np.array_equal(np.asarray(image), answer(prompt=PROMPT, image=png_base64(picture), strength=0.9))
    # An upload of another size than any the export holds (its range: 32-64 px) is resized to the model's size.
    big = np.asarray(Image.fromarray(picture).resize((96, 80)))
    image, latency = generate(None, PROMPT, None, STEPS, 5.0, False, "#000000", 0.0, 3, None, init_image=big, strength=0.5)
    assert image is not None, latency
    np.testing.assert_array_equal(np.asarray(image), answer(prompt=PROMPT, image=png_base64(big), strength=0.5, height=32, width=32))
    # What the UI hands over is the upload's path (Gradio's numpy type decoded every format Pillow opens, EPS through
    # Ghostscript too): decoded as a service decodes a client's image, PNG, JPEG or WebP.
    from_path, _ = generate(None, PROMPT, "blurry", STEPS, 5.0, False, "#000000", 0.0, 3, str(control_png[0]))
    np.testing.assert_array_equal(np.asarray(from_path), answer(prompt=PROMPT, negative_prompt="blurry", control_image=edges))
    eps = tmp_path / "upload.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    image, latency = generate(None, PROMPT, None, STEPS, 5.0, False, "#000000", 0.0, 3, str(eps))
    assert image is None and "not a readable image" in latency
    assert "the upload upload.eps" in latency and str(tmp_path) not in latency  # not the server's temporary path
    # The prompt text the encoder cut off is shown with the image (it was in the server's log alone).
    long = " ".join(f"word{i}" for i in range(120))
    image, latency = generate(None, long, None, STEPS, 5.0, False, "#000000", 0.0, 3)
    cut = server.runtime.generate_sync(GenerateBody(prompt=long, num_inference_steps=STEPS)).truncated["truncated"][0]
    assert image is not None and f"**The prompt was cut off** at the text encoder's length; this part was left out: `{cut}`" in latency
    image, latency = generate(None, PROMPT, None, STEPS, 5.0, False, "#000000", 0.0, 3)
    assert "cut off" not in latency
    # The controls start at the API's defaults: guidance for the sampler picked (LCM's 1.0; 7.5 burned its images),
    # image-to-image strength 0.8.
    import gradio as gr

    from diffrt.runtime.text_to_image_inputs import DEFAULT_STRENGTH
    from diffrt.serve.ui import default_guidance

    demo, info = build_ui(server.runtime), server.runtime.describe()
    sliders = {c.label: c.value for c in demo.blocks.values() if isinstance(c, gr.Slider)}
    assert sliders["strength (how far from the image)"] == DEFAULT_STRENGTH
    for picked in ("", "ddim", "lcm", "euler"):
        plan = server.runtime.worker.plan(GenerateBody(prompt=PROMPT, scheduler=picked or None))
        assert default_guidance(info, picked) == plan.settings["guidance_scale"], picked
    assert sliders["guidance scale"] == default_guidance(info, "") and default_guidance(info, "lcm") == 1.0
    # Picking a sampler moves the slider to its default (the event Gradio runs on the sampler's change).
    (on_pick,) = [f for f in demo.fns.values() if [c.label for c in f.inputs] == ["sampler"]]
    assert [c.label for c in on_pick.outputs] == ["guidance scale"]
    assert on_pick.fn("lcm")["value"] == 1.0 and on_pick.fn("ddim")["value"] == 7.5
    from diffrt.serve.ui import edges_preview

    assert edges_preview(str(eps)) is None and edges_preview(str(control_png[0])).shape[-1] == 3  # the preview beside it


def test_colour_guidance_without_the_source_vae_is_a_422_not_a_500(t2i_artifact, tmp_path):
    """Colour guidance takes its gradient through the PyTorch VAE, which an artifact loads from its
    source model; a deployment that carries only the artifact says so at start-up and refuses
    `color` by name, rather than failing inside the worker."""
    import json
    import shutil

    from diffrt.export.manifest import MANIFEST, write_manifest
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    artifact = shutil.copytree(t2i_artifact, tmp_path / "deployed")
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["source"]["path"] = str(tmp_path / "not-shipped")  # the source folder stayed on the build machine
    write_manifest(artifact, manifest)
    worker = make_worker(RuntimeConfig(model=str(artifact), backend="onnxruntime", device="cpu", warmup_steps=1))
    worker.load()
    assert worker.describe()["color_guidance"] is False
    with pytest.raises(RequestError) as info:
        worker.plan(GenerateBody(prompt=PROMPT, color="#ff0000"))
    assert info.value.status == 422 and info.value.field == "color" and "not-shipped" in info.value.message
    worker.plan(GenerateBody(prompt=PROMPT))  # everything else is served


def test_a_side_over_the_service_limit_is_a_422_before_any_work(t2i_folder):
    """Eager PyTorch takes any size; the service holds requests to --max-image-side, whether the size
    is asked for or comes from a control image."""
    from diffrt.serve.runtime import RuntimeConfig, ServeRuntime

    runtime = ServeRuntime(RuntimeConfig(model=str(t2i_folder), backend="torch", device="cpu", warmup_steps=1,
                                         controlnet=str(t2i_folder / "controlnet"), max_image_side=48))
    runtime.start()
    try:
        runtime.wait_ready(60)
        with pytest.raises(RequestError) as info:
            runtime.submit(GenerateBody(prompt=PROMPT, height=64, width=32))
        assert info.value.status == 422 and info.value.field == "height" and "largest side (48" in info.value.message
        big = base64.b64encode(png_bytes(torch.rand(3, 64, 64))).decode()
        with pytest.raises(RequestError) as info:
            runtime.submit(GenerateBody(prompt=PROMPT, control_image=big))
        assert info.value.field == "control_image"
        # Refused from its header, before its pixels are decoded (a 58 KB PNG of 4096 x 4096 took 525 MB first).
        from PIL import Image

        huge = io.BytesIO()
        Image.new("RGB", (4096, 4096)).save(huge, format="PNG")
        with pytest.raises(RequestError) as info:
            runtime.submit(GenerateBody(prompt=PROMPT, control_image=base64.b64encode(huge.getvalue()).decode()))
        assert "is 4096x4096 pixels, more than the largest side here (48)" in info.value.message
        # Only the side taken from the image counts: a 32-wide, 400-tall image with height 32 given is 32 x 32 (its
        # 400 pixels, resized away, refused it).
        tall = io.BytesIO()
        Image.new("RGB", (32, 400)).save(tall, format="PNG")
        plan = runtime.worker.plan(GenerateBody(prompt=PROMPT, height=32, control_image=base64.b64encode(tall.getvalue()).decode()))
        assert (plan.settings["height"], plan.settings["width"]) == (32, 32)
        runtime.submit(GenerateBody(prompt=PROMPT, height=32, width=32, num_inference_steps=1)).future.result(60)
    finally:
        runtime.close(10)


def test_eager_pytorch_serves_up_to_twice_the_models_size_unless_told(t2i_folder):
    """The largest side was 2048 whatever the model: on eager PyTorch one step of a request far past the model's
    size ran for minutes, past every deadline, the worker deaf the while."""
    from diffrt.serve.runtime import RuntimeConfig, ServeRuntime

    runtime = ServeRuntime(RuntimeConfig(model=str(t2i_folder), backend="torch", device="cpu", warmup_steps=1))
    runtime.start()
    try:
        runtime.wait_ready(60)
        largest = 2 * runtime.worker.pipe.default_size
        assert runtime.describe()["max_image_side"] == largest
        with pytest.raises(RequestError) as info:
            runtime.submit(GenerateBody(prompt=PROMPT, height=largest + 8, width=32))
        assert info.value.status == 422 and f"largest side ({largest}" in info.value.message
    finally:
        runtime.close(10)
