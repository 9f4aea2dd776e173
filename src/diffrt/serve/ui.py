"""The Gradio demo (`diffrt demo --ui`), over the same runtime as the HTTP service.

Controls: the class label (a text prompt once the runtime serves text-to-image models; the
pixel-space models served today take labels), DDIM steps, guidance scale, a colour picker for
colour guidance, and an image upload whose scikit-image Canny edge map is the control image of
ControlNet models (hidden for models without a ControlNet). Each image is shown with the latency
of its generation and the backend that ran it.
"""

from __future__ import annotations

import base64
import io
import re
import time

import numpy as np

from diffrt.serve.runtime import RuntimeConfig, ServeRuntime
from diffrt.serve.schema import DEFAULT_COLOR_SCALE, DEFAULT_GUIDANCE_SCALE, GenerateBody, RequestError

DISPLAY_SIZE = 256  # the digits are 16x16: show them large, without smoothing


def to_hex(color: str) -> str:
    """Gradio's colour picker answers '#rrggbb' or, in some versions, 'rgba(r, g, b, a)'."""
    color = color.strip()
    if re.fullmatch(r"#?[0-9a-fA-F]{6}", color):
        return color if color.startswith("#") else f"#{color}"
    m = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)", color)
    if not m:
        raise ValueError(f"colour {color!r} is neither #RRGGBB nor rgb(a)(...)")
    return "#" + "".join(f"{round(float(v)):02x}" for v in m.groups())


def canny_edges(image: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """An RGB uint8 edge map (white edges on black), the control image Canny ControlNets expect."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    image = np.asarray(image)
    gray = image.astype(np.float64) / 255.0 if image.ndim == 2 else rgb2gray(image[..., :3])
    edges = canny(gray, sigma=sigma)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_generate(runtime: ServeRuntime):
    """The demo's callback: controls -> (image, latency line). Errors become a line, not a trace."""
    from PIL import Image

    def generate(class_label, steps, guidance_scale, use_color, color, color_scale, seed, control_image=None):
        fields = dict(num_inference_steps=int(steps), guidance_scale=float(guidance_scale), seed=int(seed))
        if runtime.worker.conditioned:
            fields["class_label"] = int(class_label)
        if use_color and color:
            fields.update(color=to_hex(color), color_scale=float(color_scale))
        if control_image is not None and runtime.describe().get("controlnet"):
            fields["control_image"] = png_base64(canny_edges(control_image))
        t0 = time.perf_counter()
        try:
            answer = runtime.generate_sync(GenerateBody(**fields))
        except RequestError as exc:
            return None, f"refused ({exc.status}): {exc.message}"
        ms = 1000 * (time.perf_counter() - t0)
        image = Image.open(io.BytesIO(answer.pngs[0]))
        image = image.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST)
        t = answer.timings_ms
        return image, (f"**{ms:.0f} ms** (queue {t['queue']:.0f} ms, sampling {t['sample']:.0f} ms) "
                       f"on `{answer.backend}`, seed {answer.seed}")

    return generate


def build_ui(runtime: ServeRuntime):
    """The Blocks app over a started, ready runtime."""
    import gradio as gr

    info = runtime.describe()
    generate = make_generate(runtime)
    classes = info["class_names"] or [str(i) for i in range(info["num_classes"])]
    with gr.Blocks(title="diffrt demo", analytics_enabled=False) as demo:
        gr.Markdown(f"### diffrt: {info['conditioning']} pixel model on `{info['backend']}`")
        with gr.Row():
            with gr.Column():
                label = gr.Dropdown(choices=[(name, i) for i, name in enumerate(classes)], value=0, label="class label",
                                    visible=info["conditioning"] != "none")
                steps = gr.Slider(1, 200, value=25, step=1, label="DDIM steps (num_inference_steps)")
                guidance = gr.Slider(0.0, 15.0, value=DEFAULT_GUIDANCE_SCALE, step=0.5, label="guidance scale")
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                use_color = gr.Checkbox(value=False, label="colour guidance")
                color = gr.ColorPicker(value="#ff8800", label="colour")
                color_scale = gr.Slider(0.0, max(20.0, 4 * DEFAULT_COLOR_SCALE), value=DEFAULT_COLOR_SCALE, step=0.5,
                                        label="colour scale")
                has_control = bool(info.get("controlnet"))
                control = gr.Image(type="numpy", label="ControlNet image (Canny edges)", visible=has_control)
                edges = gr.Image(type="numpy", label="Canny edge map", interactive=False, visible=has_control)
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                output = gr.Image(type="pil", label="image", height=DISPLAY_SIZE)
                latency = gr.Markdown()
        control.change(lambda im: None if im is None else canny_edges(im), inputs=control, outputs=edges)
        button.click(generate, inputs=[label, steps, guidance, use_color, color, color_scale, seed, control],
                     outputs=[output, latency])
    return demo


def launch_ui(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, backend: str = "onnxruntime") -> None:
    """Load the model (the shipped digits by default), then serve the demo until interrupted."""
    runtime = ServeRuntime(RuntimeConfig(model=model, backend=backend))
    runtime.start()
    try:
        runtime.wait_ready(timeout=600)
        build_ui(runtime).launch(server_name=host, server_port=port, share=False)
    finally:
        runtime.close(timeout=60)
