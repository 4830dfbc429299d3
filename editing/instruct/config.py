"""The settings of learning, routing and applying an instruction, in one module that imports no torch.

They are flow parameters and UI forms (tasks/params.py), so a process that only reads them, such as a
partition run on the LUT route, starts without torch and diffusers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from editing.light_field import GRID
from editing.models import DTypeName
from editing.photometric import LUT_SIZE


class InitConfig(BaseModel):
    """Initialisation settings; r, eta and the template are the paper's."""

    top_r: int = Field(5, ge=1, description="phrases kept per side (paper: r = 5)")
    threshold: float = Field(0.15, description="minimum normalised score (paper: eta = 0.15)")
    template: str = Field("turn {before} into {after}", description="paper's instruction template")
    after_only_template: str = Field(
        "{after}", description="used when no before-phrase passes: the after-phrases as an instruction"
    )
    fallback: str | None = Field(
        None,
        description="instruction when no after-phrase passes the threshold; None = the top-1 scored "
        "after-phrase (deviation from the paper's 'None' instruction, see module docstring)",
    )
    phrases: list[str] | None = Field(
        None, description="candidate phrases; None = the shipped bank plus the model's own phrasings"
    )
    score_timesteps: tuple[int, ...] = Field(
        (650,), description="fixed timesteps for scoring; the instruction matters most at high t"
    )
    max_score_pairs: int = Field(4, ge=1, description="pairs used for scoring (cost grows linearly)")
    rows_per_batch: int = Field(96, ge=1, description="UNet rows per scoring forward pass")
    seed: int = Field(0, description="seed of the fixed scoring noise")


class LearnConfig(BaseModel):
    """Learning settings. Steps, lr and batch are ours (the paper gives none); groups, r, eta its."""

    space: Literal["attention", "text"] = Field("attention", description="what is optimised")
    steps: int = Field(400, ge=0, description="optimisation steps (same budget for both spaces)")
    lr: float = Field(
        2e-2, gt=0, description="Adam learning rate (1e-2 to 3e-2 learn equally well on the benchmark categories)"
    )
    batch_size: int = Field(4, ge=1, description="pairs per step, each at its own random timestep")
    time_groups: int = Field(5, ge=1, description="time-aware K/V sets (attention space; paper: 5)")
    holdout_pairs: int = Field(2, ge=0, description="pairs held aside to choose the best checkpoint")
    eval_every: int = Field(25, ge=1, description="steps between held-out evaluations")
    eval_timesteps: tuple[int, ...] = Field(
        (100, 300, 500, 700, 900), description="fixed timesteps of the held-out evaluation"
    )
    seed: int = Field(0, description="seeds pair/timestep/noise sampling and the evaluation noise")
    init_instruction: str | None = Field(
        None, description="skip the phrase search and start from this instruction"
    )
    init: InitConfig = Field(default_factory=InitConfig)
    guidance_candidates: tuple[float, ...] = Field(
        (1.0, 1.5, 2.0),
        description="text guidance scales tried after learning; the one with the best PSNR on the "
        "exemplar pairs becomes the instruction's default (empty: keep the model's default)",
    )
    progress: bool = Field(True, description="show a progress bar")


RouteName = Literal["auto", "lut", "lut+instructbrush", "instructbrush"]


class RouteConfig(BaseModel):
    """How the photometric stage is fitted and the route chosen."""

    route: RouteName = Field(
        "auto",
        description="auto: choose on held-out pairs; lut: the fitted 3D LUT alone; lut+instructbrush: "
        "the LUT, then an instruction learned on what it leaves; instructbrush: the instruction alone",
    )
    lut_size: int = Field(LUT_SIZE, ge=2, le=65, description="lattice points per axis of the fitted 3D LUT")
    holdout_pairs: int = Field(
        2, ge=1, le=100, description="pairs held back to score the routes (auto); fewer than 2 left to "
        "learn on: the LUT alone"
    )
    margin_db: float = Field(
        0.5, ge=0, le=20, description="a learned route must beat the LUT alone by this much PSNR (auto)"
    )
    seed: int = Field(0, ge=0, description="seeds the held-out split")
    light_field: bool = Field(
        True, description="fit a light field under the LUT (a vignette, a dodge or burn in a fixed place of "
        "the frame) when leaving each pair out shows it gains margin_db"
    )
    light_field_grid: int = Field(GRID, ge=2, le=33, description="lattice points per axis of the light field")


class ApplyConfig(BaseModel):
    """Application settings; None takes the instruction's learned defaults (guidance chosen on its
    exemplar pairs), then the model's edits.json defaults (else IP2P's)."""

    # An infinite or NaN guidance scale would turn every output into NaN, not into an error.
    model_config = ConfigDict(allow_inf_nan=False)

    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, description="text guidance scale")
    image_guidance_scale: float | None = Field(None, ge=0, description="image guidance scale")
    batch_size: int = Field(16, ge=1, description="images per UNet batch (x2 or x3 rows with guidance)")
    full_resolution: bool = Field(True, description="lift the native-size edit to the input size")
    channels_last: bool = Field(
        True, description="run the UNet and VAE in channels-last memory format (faster, same outputs)"
    )
    dtype: DTypeName = Field(
        "float32",
        description="compute dtype the model must be loaded in (load_model(dtype=...)); bfloat16 is "
        "faster on CPUs with AMX / AVX512-BF16 and usually on GPUs, its outputs within about 1/100 of "
        "float32's (measured speed-up: README, 'Learned instructions')",
    )
    progress: bool = Field(False)
