"""The body of `POST /v1/generate`: diffusers' argument names, typed and bounded.

Unknown fields are refused (`extra="forbid"`) rather than ignored, so a misspelt
`num_inference_step` is a 422 that names it, not a silent default. Whether the loaded model can
use a field (a prompt on a pixel-space model, say) is checked later, by the worker that knows
the model (worker.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffrt.generate import DEFAULT_PIXEL_GUIDANCE_SCALE, GenerateRequest
from diffrt.runtime.text_to_image import DEFAULT_GUIDANCE_SCALE

MAX_SEED = 2**63 - 1
MAX_SIDE = 4096  # pixels: the largest height and width a request may name
MAX_CONTROLNETS = 8  # a list field's longest: one entry per ControlNet (a list of a million made a million errors)
MAX_ERRORS = 10  # named in a 422; the rest are counted
ControlScale = Annotated[float, Field(ge=0.0, le=5.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]  # of the steps
ControlScales = Annotated[list[ControlScale], Field(max_length=MAX_CONTROLNETS)]
Fractions = Annotated[list[Fraction], Field(max_length=MAX_CONTROLNETS)]
DEFAULT_COLOR_SCALE = GenerateRequest.color_scale  # `diffrt generate`'s, tuned on the shipped digits model


class GenerateBody(BaseModel):
    """One generation request. Leave a field out to get `diffrt generate`'s default."""

    # strict: "5" is not 5 and true is not 1; JSON numbers still fill float fields.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str | None = Field(None, max_length=4000, description="text-to-image models only")
    negative_prompt: str | None = Field(None, max_length=4000, description="text-to-image models only")
    class_label: int | None = Field(None, ge=0, le=1_000_000, description="class-conditioned models: the class to draw")
    num_inference_steps: int = Field(25, ge=1, le=200, description="denoising steps (LCM: at most the model's "
                                     "original_inference_steps, 50 for LCM-LoRA; 2-8 is LCM's range)")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description=f"classifier-free guidance (default {DEFAULT_PIXEL_GUIDANCE_SCALE}; {DEFAULT_GUIDANCE_SCALE} for text-to-image)")
    guidance_rescale: float | None = Field(None, ge=0.0, le=1.0, description="text-to-image models only: diffusers' "
                                           "guidance_rescale (default 0; 0.7 tames over-exposure at high guidance)")
    clip_skip: int | None = Field(None, ge=0, le=64, description="text-to-image models only: diffusers' clip_skip, the text "
                                  "encoder layer before the last that encodes the prompt (default 0)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="initial-noise seed; random (and reported) when left out")
    height: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels; default: the model's sample size")
    width: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels; default: the model's sample size")
    num_images: int = Field(1, ge=1, le=64, description="images from this seed, as `diffrt generate --num-images`")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0: deterministic); LCM, DPM-Solver++, Euler and Euler "
                     "Ancestral take none")
    scheduler: Literal["ddim", "lcm", "dpm", "euler", "euler_a"] | None = Field(
        None, description="the sampler, on the model's training schedule: ddim, lcm (LCM-LoRA; guidance_scale 1.0 by "
                          "default), dpm (DPM-Solver++(2M), 20-25 steps), euler or euler_a (Euler Ancestral, 'Euler a'); "
                          "default: the model's own, the one its scheduler config names")
    color: str | None = Field(None, pattern=r"^#?[0-9a-fA-F]{6}$", description="colour guidance target, #RRGGBB")
    color_scale: float = Field(DEFAULT_COLOR_SCALE, ge=0.0, le=10_000.0, description="colour guidance strength")
    control_image: str | Annotated[list[str], Field(max_length=MAX_CONTROLNETS)] | None = Field(
        None, description="ControlNet models only: base64-encoded PNG, or a list of them, one per ControlNet in their order")
    controlnet_conditioning_scale: ControlScale | ControlScales | None = Field(
        None, description="ControlNet models only: one scale for all ControlNets, or one per ControlNet "
                          "(default 1.0; 0.8 with image, as diffusers' ControlNet img2img)")
    control_guidance_start: Fraction | Fractions | None = Field(
        None, description="ControlNet models only: the fraction of the steps at which each ControlNet starts, one for all "
                          "or one per ControlNet (default 0), as diffusers' ControlNet pipelines")
    control_guidance_end: Fraction | Fractions | None = Field(
        None, description="ControlNet models only: the fraction of the steps at which each ControlNet stops (default 1)")
    guess_mode: bool | None = Field(
        None, description="ControlNet models only: diffusers' guess_mode, the ControlNets see the prompt's half of the CFG "
                          "batch only, their residuals weighted by depth (default off; on by itself for a shuffle ControlNet)")
    image: str | None = Field(None, description="text-to-image models only: image-to-image from this base64-encoded PNG")
    strength: float | None = Field(None, ge=0.0, le=1.0, description="image-to-image: how much of the schedule runs "
                                   "(default 0.8; 1.0: the image is all noise)")
    lora_scale: float | None = Field(None, ge=-5.0, le=5.0, description="times the scales of the LoRA the model runs (default 1.0; 0: the base model; "
                                      "below 0: backwards, for slider LoRAs); "
                                      "torch and refittable TensorRT engines only, ONNX graphs with LoRA baked in take 1.0")


class RequestError(Exception):
    """A request the service refuses: HTTP status, the field at fault (if one) and a one-line message."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                 profile: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.profile = profile  # a shape outside the engine's built ranges (RELIABILITY #3), counted in /metrics

    def payload(self) -> dict:
        return {"detail": self.message, "field": self.field}


def describe_validation_errors(errors: list[dict]) -> tuple[int, str, list[dict]]:
    """pydantic/FastAPI validation errors -> (status, one-line message naming each field, clean list).

    Malformed JSON is a 400 (the body is not a request at all); everything else is a 422. The
    offending input is not echoed back: it may be a 20 MB string. The first MAX_ERRORS errors are
    named, the others counted (20,000 unknown keys made an 8.6 MB answer), and unknown fields are
    named together, with the accepted ones once.
    """
    clean, parts, unknown, status = [], [], [], 422
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            status = 400
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"request body is not valid JSON ({reason or err.get('msg')})")
            loc = []
        elif kind == "extra_forbidden":
            unknown.append(".".join(loc))
        elif kind == "missing" and not loc:
            parts.append("request body is missing; send a JSON object")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        if len(clean) < MAX_ERRORS:
            clean.append({"field": ".".join(loc) or None, "type": kind, "msg": err.get("msg")})
    if unknown:
        more = f" and {len(unknown) - MAX_ERRORS} more" if len(unknown) > MAX_ERRORS else ""
        parts.append(f"{', '.join(unknown[:MAX_ERRORS])}{more}: unknown field{'s' if len(unknown) > 1 else ''}; "
                     f"accepted fields are {', '.join(GenerateBody.model_fields)}")
    if len(parts) > MAX_ERRORS:
        parts = [*parts[:MAX_ERRORS], f"and {len(parts) - MAX_ERRORS} more errors"]
    return status, "; ".join(parts) or "invalid request", clean
