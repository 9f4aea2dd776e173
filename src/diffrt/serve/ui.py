"""The Gradio demo (`diffrt demo --ui [--model DIR]`), over the same runtime as the HTTP service.

Controls follow the model served: a class label for class-conditioned pixel models, a prompt and
negative prompt for text-to-image ones; DDIM steps, guidance scale, a colour picker for colour
guidance, an image upload whose scikit-image Canny edge map is the control image of ControlNet
models (hidden for models without one), an image to start from and its strength (image-to-image,
text-to-image models whose service takes it; uploads are resized to the model's own size, which any
export holds), and the LoRA strength (`lora_scale`) where the model
runs a LoRA whose strength can change (PyTorch, refittable TensorRT engines; not a LoRA baked
into ONNX graphs). Each image is shown with the latency of its generation and the backend that ran it.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from diffrt.errors import DiffrtError
from diffrt.generate import DEFAULT_PIXEL_GUIDANCE_SCALE
from diffrt.runtime.text_to_image import DEFAULT_GUIDANCE_SCALE, LCM_GUIDANCE_SCALE
from diffrt.runtime.text_to_image_inputs import DEFAULT_STRENGTH
from diffrt.serve.runtime import RuntimeConfig, ServeRuntime
from diffrt.serve.schema import DEFAULT_COLOR_SCALE, GenerateBody, RequestError

DISPLAY_SIZE = 256  # the digits are 16x16: show them large, without smoothing

log = logging.getLogger(__name__)


def to_hex(color: str) -> str:
    """Gradio's colour picker answers '#rrggbb' or, in some versions, 'rgba(r, g, b, a)'."""
    color = color.strip()
    if re.fullmatch(r"#?[0-9a-fA-F]{6}", color):
        return color if color.startswith("#") else f"#{color}"
    m = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)", color)
    if not m:
        raise ValueError(f"colour {color!r} is neither #RRGGBB nor rgb(a)(...)")
    values = [round(float(v)) for v in m.groups()]
    if max(values) > 255:
        raise ValueError(f"colour {color!r}: each of red, green and blue is 0 to 255")
    return "#" + "".join(f"{v:02x}" for v in values)


UPLOAD_MAX_SIDE = 1024  # pixels: uploads are shrunk to this first; the pipeline takes them at the model's size
UPLOAD_MAX_BYTES = "20mb"  # Gradio's limit on a file sent to the demo
UPLOAD_MAX_PIXELS = 64_000_000  # larger uploads are refused before their pixels are decoded


def uploaded(value) -> np.ndarray:
    """An upload as RGB uint8 [H, W, 3]. The demo's image inputs hand over the file's path (type "filepath", no
    image_mode: Gradio returns it before decoding), which is decoded as a service decodes a client's image: PNG,
    JPEG or WebP only (never EPS, which Pillow renders with Ghostscript), its size checked before its pixels. An
    array (the Python API, tests) is taken as it is. Gradio's own preview of an upload is Gradio's."""
    from diffrt.images import WEB_FORMATS, load_image

    if isinstance(value, (str, os.PathLike)):  # named by its file name: the path is the server's temporary one
        image = load_image(value, formats=WEB_FORMATS, max_pixels=UPLOAD_MAX_PIXELS, name=f"the upload {Path(value).name}")
        return (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = np.asarray(value)
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def bounded(image) -> np.ndarray:
    """An upload shrunk (aspect kept, Lanczos) so that its longer side is at most UPLOAD_MAX_SIDE: Canny on a 6000 x
    6000 photo took 15 s and 2.3 GB, on every change of the upload and again for each click."""
    from PIL import Image

    image = uploaded(image)
    if max(image.shape[:2]) <= UPLOAD_MAX_SIDE:
        return image
    im = Image.fromarray(image)
    im.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE), Image.LANCZOS)
    return np.asarray(im)


def canny_edges(image: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """An RGB uint8 edge map (white edges on black), the control image Canny ControlNets expect, of the upload
    shrunk to UPLOAD_MAX_SIDE (bounded)."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    image = bounded(image)
    gray = rgb2gray(image)
    edges = canny(gray, sigma=sigma)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


def edges_preview(upload) -> np.ndarray | None:
    """The edge map shown beside an upload; none for an upload that is not an image the demo takes (Generate says
    why, as it refuses it)."""
    try:
        return None if upload is None else canny_edges(upload)
    except DiffrtError:
        return None


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def display(image):
    """Small images (the digits are 16x16) scaled up by a whole factor, without smoothing; others as they are."""
    from PIL import Image

    factor = max(1, DISPLAY_SIZE // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def default_guidance(info: dict, scheduler: str | None) -> float:
    """The guidance scale the HTTP API and `diffrt generate` run a request at that gives none, for the sampler picked
    ("" or None: the model's own): 1.0 for LCM on a text-to-image UNet without guidance embedding, 7.5 for the other
    text-to-image samplers, 2.0 for pixel models (the guidance slider is set to it when the sampler changes)."""
    if info["kind"] != "text-to-image":
        return DEFAULT_PIXEL_GUIDANCE_SCALE
    lcm = (scheduler or info.get("scheduler")) == "lcm" and not info.get("guidance_embedded")
    return LCM_GUIDANCE_SCALE if lcm else DEFAULT_GUIDANCE_SCALE


def status_line(answer, ms: float) -> str:
    """The line under an image: latency, backend, seed, and the prompt text the encoder cut off (RELIABILITY #13:
    a service says so with its answer, not in its log alone)."""
    t = answer.timings_ms
    line = f"**{ms:.0f} ms** (queue {t['queue']:.0f} ms, sampling {t['sample']:.0f} ms) on `{answer.backend}`, seed {answer.seed}"
    for key, what in (("truncated", "prompt"), ("truncated_negative", "negative prompt")):
        cut = answer.cut_off(key)
        if cut:
            line += f"  \n**The {what} was cut off** at the text encoder's length; this part was left out: `{cut}`"
    return line


def make_generate(runtime: ServeRuntime):
    """The demo's callback: the controls, in build_ui's order -> (image, latency line). Errors
    become a line, not a trace. Fields the served model does not take are left out."""
    from PIL import Image

    info = runtime.describe()
    text = info["kind"] == "text-to-image"
    # An unconditional pixel model takes no label (its dropdown is hidden and empty) and runs no classifier-free guidance.
    labelled = not text and info["conditioning"] != "none"
    guided = text or labelled

    def generate(class_label, prompt, negative_prompt, steps, guidance_scale, use_color, color, color_scale, seed,
                 control_image=None, lora_scale=1.0, scheduler=None, init_image=None, strength=DEFAULT_STRENGTH):
        from pydantic import ValidationError

        t0 = time.perf_counter()
        try:
            empty = [name for name, value, shown in (("steps", steps, True), ("guidance scale", guidance_scale, guided),
                                                      ("class label", class_label, labelled)) if shown and value is None]
            if empty:  # a cleared Dropdown (or a client of the app's API) sends None
                return None, f"refused: {empty[0]} is empty; fill it in"
            if use_color and not color:
                return None, "refused: colour guidance is ticked with no colour; pick one, or untick it"
            fields = dict(num_inference_steps=int(steps), seed=None if seed is None else int(seed),  # cleared: a random seed
                          scheduler=scheduler or None)
            if guided:
                fields["guidance_scale"] = float(guidance_scale)
            if text:
                fields.update(prompt=prompt or "", negative_prompt=negative_prompt or None)
            elif labelled:
                fields["class_label"] = int(class_label)
            if use_color and color:
                fields.update(color=to_hex(color), color_scale=float(color_scale))
            if control_image is not None and info.get("controlnet"):
                fields["control_image"] = png_base64(canny_edges(control_image))
            if init_image is not None and text:
                fields.update(image=png_base64(bounded(init_image)), strength=float(strength))
            if text and (fields.get("control_image") or fields.get("image")):
                # An upload of any size, resized by the pipeline to the model's own (the one size an export is
                # sure to hold): the demo has no size controls.
                fields.update(height=info["sample_size"], width=info["sample_size"])
            if info.get("lora_scalable"):
                fields["lora_scale"] = float(lora_scale)
            answer = runtime.generate_sync(GenerateBody(**fields))
        except RequestError as exc:
            return None, f"refused ({exc.status}): {exc.message}"
        except ValidationError as exc:  # the same limits the HTTP API applies: one line per field at fault
            return None, "refused: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        except (ValueError, DiffrtError) as exc:  # a colour the picker sent that is no colour, an unreadable upload
            return None, f"refused: {exc}"
        ms = 1000 * (time.perf_counter() - t0)
        return display(Image.open(io.BytesIO(answer.images[0]))), status_line(answer, ms)

    return generate


def build_ui(runtime: ServeRuntime):
    """The Blocks app over a started, ready runtime."""
    import gradio as gr

    info = runtime.describe()
    generate = make_generate(runtime)
    text = info["kind"] == "text-to-image"
    with gr.Blocks(title="diffrt demo", analytics_enabled=False) as demo:
        what = "text-to-image" + (" + ControlNet" if info.get("controlnet") else "") if text else f"{info['conditioning']} pixel"
        gr.Markdown(f"### diffrt: {what} model on `{info['backend']}`")
        with gr.Row():
            with gr.Column():
                classes = [] if text else (info["class_names"] or [str(i) for i in range(info["num_classes"])])
                label = gr.Dropdown(choices=[(name, i) for i, name in enumerate(classes)], value=0 if classes else None,
                                    label="class label", visible=not text and info["conditioning"] != "none")
                prompt = gr.Textbox(label="prompt", visible=text)
                negative = gr.Textbox(label="negative prompt", visible=text)
                scheduler = gr.Dropdown(choices=[("the model's own", ""), ("DDIM", "ddim"), ("LCM (LCM-LoRA: 4 steps, guidance 1)", "lcm"),
                                                 ("DPM-Solver++ (20-25 steps)", "dpm"), ("Euler", "euler"),
                                                 ("Euler Ancestral ('Euler a')", "euler_a")],
                                        value="", label="sampler")
                steps = gr.Slider(1, 200, value=25, step=1, label="steps (num_inference_steps)")
                guidance = gr.Slider(0.0, 15.0, value=default_guidance(info, ""), step=0.5, label="guidance scale",
                                     visible=text or info["conditioning"] != "none")
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                use_color = gr.Checkbox(value=False, label="colour guidance")
                color = gr.ColorPicker(value="#ff8800", label="colour")
                color_scale = gr.Slider(0.0, max(20.0, 4 * DEFAULT_COLOR_SCALE), value=DEFAULT_COLOR_SCALE, step=0.5,
                                        label="colour scale")
                has_control = bool(info.get("controlnet"))
                # Paths, decoded here (`uploaded`): Gradio's numpy type decodes every format Pillow opens, EPS too.
                control = gr.Image(type="filepath", image_mode=None, label="ControlNet image (Canny edges)", visible=has_control)
                edges = gr.Image(type="numpy", label="Canny edge map", interactive=False, visible=has_control, format="png")
                img2img = text and bool(info.get("image_to_image"))
                init_image = gr.Image(type="filepath", image_mode=None, label="start from this image (image-to-image)",
                                      visible=img2img)
                strength = gr.Slider(0.05, 1.0, value=DEFAULT_STRENGTH, step=0.05, label="strength (how far from the image)",
                                     visible=img2img)
                lora_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale",
                                       visible=bool(info.get("lora_scalable")))
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                # PNG: Gradio's default, WebP at quality 80, showed (and downloaded) other pixels than were made.
                output = gr.Image(type="pil", label="image", height=max(DISPLAY_SIZE, info.get("sample_size") or 0), format="png")
                latency = gr.Markdown()
        control.change(edges_preview, inputs=control, outputs=edges)
        # The API's default for the sampler picked (LCM-LoRA's 1.0: 7.5 burns its images); the user may move it after.
        scheduler.change(lambda picked: gr.update(value=default_guidance(info, picked)), inputs=scheduler, outputs=guidance)
        button.click(generate, inputs=[label, prompt, negative, steps, guidance, use_color, color, color_scale, seed, control, lora_scale,
                                       scheduler, init_image, strength],
                     outputs=[output, latency])
    return demo


def launch_ui(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, backend: str = "onnxruntime",
              controlnet: list[str] | None = None, loras: list[tuple[str, float]] = ()) -> None:
    """Load the model (the shipped digits by default), then serve the demo until interrupted."""
    from diffrt.serve.app import LOOPBACK, check_port_free

    check_port_free(host, port)  # before minutes of loading, not after
    if host not in LOOPBACK:  # the demo has no API key: anyone who reaches the port can run the model
        log.warning("the demo UI on %s has no authentication: anyone who reaches port %d can generate; keep it on "
                    "127.0.0.1 (the default) or behind an authenticating proxy", host, port)
    if controlnet is not None and len(controlnet) > 1:
        raise DiffrtError(f"--controlnet given {len(controlnet)} times: the demo UI takes one control image, for one "
                          "ControlNet; serve several with `diffrt serve` (one control_image per ControlNet)")
    runtime = ServeRuntime(RuntimeConfig(model=model, backend=backend, controlnet=controlnet, loras=list(loras)))
    runtime.start()
    try:
        runtime.wait_ready(timeout=600)
        check_one_controlnet(runtime.describe())
        if port == 0:  # Gradio takes no 0 (it listened there, reported ":0" and failed its own start-up check)
            port = check_port_free(host, 0)
        demo = build_ui(runtime)
        demo.launch(server_name=host, server_port=port, share=False, max_file_size=UPLOAD_MAX_BYTES, prevent_thread_lock=True)
        try:  # Gradio's own wait took Ctrl-C as a normal end (exit 0): a script calling the demo would not stop
            while True:
                time.sleep(0.5)
        finally:  # KeyboardInterrupt goes on to the CLI, which ends the run as interrupted
            demo.close()
    finally:
        runtime.close(timeout=60)


def check_one_controlnet(info: dict) -> None:
    """The demo has one upload for the control image: an artifact exported with several ControlNets is refused at
    start, rather than every Generate being refused for the control images it cannot send."""
    if info.get("controlnets", 0) > 1:
        raise DiffrtError(f"this model runs {info['controlnets']} ControlNets and the demo UI takes one control image; "
                          "serve it with `diffrt serve` (one control_image per ControlNet)")
