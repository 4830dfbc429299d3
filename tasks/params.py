"""The typed parameters of the refresh flows: the same pydantic models are the flow signatures, the
Prefect UI's run forms (field descriptions and bounds show up there) and `retouch refresh --config`.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from editing.instruct.config import ApplyConfig, LearnConfig, RouteConfig, RouteName
from editing.models import DTypeName
from editing.quality import (
    FAIL_DELTAE_MEAN,
    FAIL_DELTAE_P95,
    FAIL_SKIN_OUTLIERS,
    FLAG_DELTAE_MEAN,
    FLAG_DELTAE_P95,
    FLAG_SKIN_OUTLIERS,
    QCThresholds,
)


class _Config(BaseModel):
    # A typo in a YAML config or UI form should be an error, not a silently ignored field; an
    # infinite or NaN number is never a setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LearnParams(_Config):
    """How an instruction is learned from a category's exemplar pairs (editing.instruct.LearnConfig).

    Every field except min_pairs is part of the instruction cache key: changing one relearns every
    category.
    """

    steps: int = Field(
        60, ge=0, le=5000,
        description="Optimisation steps per category. 60 keep the demo's three categories within a few "
        "minutes on 2 CPU cores; a GPU worker can afford the method's 300.",
    )
    space: Literal["attention", "text"] = Field(
        "attention", description="What is optimised: per-layer attention keys/values (InstructBrush) or "
        "the instruction's text embedding (VISII-style baseline).",
    )
    lr: float = Field(2e-2, gt=0, le=1.0, description="Adam learning rate (the method's default).")
    batch_size: int = Field(4, ge=1, le=256, description="Exemplar pairs per optimisation step.")
    time_groups: int = Field(5, ge=1, le=50, description="Time-aware K/V sets (attention space).")
    seed: int = Field(0, ge=0, description="Seed of the optimisation (timesteps, noise, held-out split).")
    init_instruction: str | None = Field(
        None, description="Start from this instruction instead of searching the phrase bank (faster; "
        "use when the retoucher can name the edit).")
    min_pairs: int = Field(
        2, ge=1, le=1000,
        description="A category with fewer usable exemplar pairs is reported and not learned; its "
        "catalogue items get error rows.",
    )
    route: RouteName = Field(
        "auto", description="auto: choose per category on held-out pairs between the fitted 3D LUT alone, "
        "the LUT then a learned instruction, and the learned instruction alone; or force one of them.")
    lut_size: int = Field(33, ge=2, le=65, description="Lattice points per axis of the fitted 3D LUT.")
    route_margin_db: float = Field(
        0.5, ge=0, le=20, description="auto: a learned route must beat the LUT alone by this much PSNR on "
        "the held-out pairs.")
    light_field: bool = Field(
        True, description="Fit a light field under the LUT (a vignette, a dodge or burn in a fixed place of the "
        "frame) when leaving each exemplar pair out shows it helps by route_margin_db.")

    def for_method(self) -> LearnConfig:
        return LearnConfig(steps=self.steps, space=self.space, lr=self.lr, batch_size=self.batch_size,
                           time_groups=self.time_groups, seed=self.seed,
                           init_instruction=self.init_instruction, progress=False)

    def for_route(self) -> RouteConfig:
        return RouteConfig(route=self.route, lut_size=self.lut_size, margin_db=self.route_margin_db,
                           seed=self.seed, light_field=self.light_field)

    def cache_fields(self) -> dict:
        """What the learned result depends on (min_pairs only decides whether to learn at all)."""
        return self.model_dump(exclude={"min_pairs"})


class ApplyParams(_Config):
    """How a learned instruction is applied to catalogue images (editing.instruct.ApplyConfig).
    Empty fields take the model's own defaults (its edits.json)."""

    num_inference_steps: int | None = Field(None, ge=1, le=200, description="Denoising steps per image.")
    guidance_scale: float | None = Field(None, ge=0, le=30.0, description="Text (instruction) guidance scale.")
    image_guidance_scale: float | None = Field(None, ge=0, le=10.0, description="Image guidance scale: "
                                               "higher keeps the output closer to the source photo.")
    batch_size: int = Field(16, ge=1, le=256, description="Images per model call; bounds memory per worker.")
    max_batch_pixels: int = Field(
        64_000_000, ge=1_000_000, le=4_000_000_000,
        description="Input pixels per model call: a batch is cut short when its photos add up to more, "
        "because lifting the edits to full resolution needs memory per pixel (a photo larger than this "
        "is edited alone).")
    dtype: DTypeName = Field(
        "float32", description="Compute dtype of the model step: bfloat16 is faster on CPUs with AMX / "
        "AVX512-BF16 and on GPUs, its outputs within about 1/100 of float32's (README: Speed); float16 is "
        "meant for GPUs.")

    def for_method(self) -> ApplyConfig:
        return ApplyConfig(**self.model_dump(exclude={"max_batch_pixels"}), full_resolution=True, progress=False)


class QCConfig(_Config):
    """Thresholds of the closed-form quality checks (editing/quality.py): fail = do not publish,
    flag = a reviewer should look."""

    fail_ssim_structure: float = Field(0.35, ge=0, le=1, description="SSIM structure term below "
                                       "which the product's shape counts as lost (fail).")
    flag_ssim_structure: float = Field(0.6, ge=0, le=1, description="SSIM structure term below which "
                                       "the item is flagged.")
    flag_direction_agreement: float = Field(0.5, ge=-1, le=1, description="Cosine between the item's "
                                            "colour-statistics shift and the exemplars'; below: flag.")
    flag_strength_min: float = Field(0.3, ge=0, le=100, description="Edit strength relative to the "
                                     "exemplars below which the edit is flagged as too weak.")
    flag_strength_max: float = Field(3.0, ge=0, le=100, description="Edit strength relative to the "
                                     "exemplars above which the edit is flagged as too strong.")
    flag_clipped_fraction: float = Field(0.2, ge=0, le=1, description="Fraction of newly clipped "
                                         "pixels above which the item is flagged.")
    fail_clipped_fraction: float = Field(0.5, ge=0, le=1, description="Fraction of newly clipped "
                                         "pixels above which the item fails.")
    fail_output_std: float = Field(0.01, ge=0, le=1, description="Luminance standard deviation below "
                                   "which the output counts as flat (fail).")
    flag_deltae2000_mean: float = Field(
        FLAG_DELTAE_MEAN, ge=0, le=100, description="Mean CIEDE2000 between the output and the category's "
        "LUT applied to the source above which the item is flagged (a cast, a hue shift, another grade).")
    fail_deltae2000_mean: float = Field(
        FAIL_DELTAE_MEAN, ge=0, le=100, description="Mean CIEDE2000 against the category's LUT(source) above "
        "which the item fails.")
    flag_deltae2000_p95: float = Field(
        FLAG_DELTAE_P95, ge=0, le=100, description="95th-percentile CIEDE2000 against the category's "
        "LUT(source) above which the item is flagged (a local cast, e.g. a red face).")
    fail_deltae2000_p95: float = Field(
        FAIL_DELTAE_P95, ge=0, le=100, description="95th-percentile CIEDE2000 against the category's "
        "LUT(source) above which the item fails.")
    flag_skin_outliers: float = Field(
        FLAG_SKIN_OUTLIERS, ge=0, le=1, description="Share of the source's skin-toned pixels the output "
        "pushes out of any skin tone (too saturated, too red, too green) above which the item is flagged; "
        "checked whatever the category's own edit does.")
    fail_skin_outliers: float = Field(
        FAIL_SKIN_OUTLIERS, ge=0, le=1, description="Share of skin-toned pixels pushed out of any skin tone "
        "above which the item fails.")

    @model_validator(mode="after")
    def _flag_before_fail(self) -> QCConfig:
        # Refused when the config is read, not when the first partition is checked; the order rule
        # itself is editing.quality.QCThresholds'.
        self.thresholds()
        return self

    def thresholds(self) -> QCThresholds:
        return QCThresholds(**self.model_dump())


class ReviewConfig(BaseModel):
    """How a run's outputs get their verdicts; a flow parameter, so it shows in the UI form."""

    policy: Literal["human", "auto_approve_passing"] = Field(
        default="human",
        description=(
            "human: pause (or suspend under a deployment) until a reviewer decides. "
            "auto_approve_passing: approve QC-pass items and reject the rest without waiting (demo). "
            "Under a deployment the deployment's own policy decides: a run asking for auto-approval "
            "on a human-review deployment is refused."
        ),
    )
    timeout_s: int = Field(
        default=24 * 3600,
        ge=1,
        le=14 * 24 * 3600,
        description="How long the run waits for decisions before pending items become expired.",
    )
    poll_interval_s: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="How often a paused run checks for a decision (resume latency is at most this).",
    )
    link_expiry_s: int = Field(
        default=3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the presigned contact-sheet links shown to the reviewer and in artifacts; "
        "the run summary keeps store keys. `retouch review list` prints fresh links.",
    )


# The reviewer's name is recorded on manifest rows and written to logs: printable text only.
MAX_REVIEWER_CHARS = 200
# What the Prefect server can refuse at resume time (JSON-schema `pattern`, the same in Python, Rust and
# JavaScript regex syntax): control, zero-width, bidirectional and line-separator characters, and a
# name of spaces only. `check_reviewer` is the full rule; the flow refuses what gets past this.
_NOT_IN_NAMES = r"\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb"
REVIEWER_PATTERN = rf"^[^{_NOT_IN_NAMES}]*[^{_NOT_IN_NAMES}\s][^{_NOT_IN_NAMES}]*$"


def check_reviewer(name: str) -> str:
    """The reviewer's name, stripped; `ValueError` unless it is printable text of at most 200 characters.

    One rule for every way a name comes in: the CLI, the Resume form and replayed decision records.
    Printable means no control, format (zero-width, bidirectional override) or line-break character and
    no space other than U+0020: such characters forge log lines or hide who decided.
    """
    cleaned = name.strip()
    if not cleaned:
        raise ValueError("reviewer is empty")
    if len(cleaned) > MAX_REVIEWER_CHARS:
        raise ValueError(f"reviewer has {len(cleaned)} characters, at most {MAX_REVIEWER_CHARS} are allowed")
    for char in cleaned:
        if not char.isprintable():
            what = unicodedata.name(char, unicodedata.category(char))
            raise ValueError(f"reviewer contains U+{ord(char):04X} ({what}); only printable text is allowed")
    return cleaned


class ReviewDecision(RunInput):
    """The Resume form. `reviewer` is required and never pre-filled, so nobody approves anonymously."""

    reviewer: str = Field(min_length=1, max_length=MAX_REVIEWER_CHARS, pattern=REVIEWER_PATTERN,
                          description="Who decides; recorded on every manifest row.")
    approve_all_passing: bool = Field(default=False, description="Approve every item that passed QC.")
    approve_ids: list[str] = Field(
        default_factory=list, description="Approve these image ids, even if QC flagged them."
    )
    reject_ids: list[str] = Field(
        default_factory=list, description="Reject these image ids (wins over approve_ids)."
    )
    categories: list[str] | None = Field(
        default=None,
        description=(
            "Decide every item of these categories; items of other categories keep waiting. "
            "Unset: all categories. Empty list: only the listed ids."
        ),
    )
    comment: str = Field(default="", max_length=2000, description="Free text, kept in the run's log and summary.")

    @field_validator("reviewer")
    @classmethod
    def _printable_reviewer(cls, value: str) -> str:
        return check_reviewer(value)


class RefreshConfig(_Config):
    """One catalogue refresh: where the data is, which model, and how to learn, apply, check and review."""

    store_uri: str = Field(
        min_length=1, pattern=r"\S",
        description="Root holding exemplars/ and catalogue/ (local path or s3://bucket/prefix).")
    output_uri: str | None = Field(
        None, description="Root for instructions/, edited/, manifest/ and runs/; empty = the input store.")
    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Names the run's outputs. Empty = the flow run's scheduled start (UTC), so a retry "
        "of the same flow run resumes into the same keys.",
    )
    categories: list[str] | None = Field(None, description="Only these categories; empty = all with exemplars.")
    model_uri: str | None = Field(
        None, description="InstructPix2Pix-format model folder (local path or s3:// prefix); empty = the "
        "shipped tiny model.")
    device: str = Field("cpu", description="torch device of the model step, e.g. cpu or cuda.")
    workers: int = Field(2, ge=1, le=64, description="Partitions processed at once in this process "
                         "(I/O and QC overlap; the model step itself runs one batch at a time). Not used "
                         "when gpu_work_pool is set: see pool_in_flight.")
    model_slot: str | None = Field(
        None, description="Prefect global concurrency limit held around every model call (create it "
        "with `prefect gcl create NAME --limit N`); empty = no server-side slot.")
    gpu_work_pool: str | None = Field(
        None, description="Edit the partitions as `refresh-partition` deployment runs on this work pool "
        "(GPU workers elsewhere), packed into runs of at most shard_size items, instead of in this process.")
    partition_deployment: str = Field(
        "refresh-partition/gpu", description="The deployment started per pack of partitions when gpu_work_pool is set.")
    pool_in_flight: int | None = Field(
        None, ge=1, le=1000,
        description="gpu_work_pool only: runs sent to the pool at once, and the number of runs the night is "
        "packed into a multiple of. Empty = the pool's concurrency limit (`prefect work-pool "
        "set-concurrency-limit`); if the pool has none, every run is sent (the workers' --limit then decides "
        "how many run) and the night is packed for the pool's online workers.")
    partition_silence_s: int = Field(
        120, ge=45, le=3600,
        description="gpu_work_pool only: a partition run taken by a worker that sends no heartbeat and "
        "changes no state for this long is marked Crashed and sent to the pool again (its worker was "
        "lost). Heartbeats come every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30 on the partition "
        "deployment, Prefect's minimum); keep this above the time a worker needs to start a run.")
    shard_size: int = Field(
        500, ge=1, le=10_000,
        description="A partition of more items is cut into shards of at most this many, each edited as its own "
        "task; the manifest stays one file per partition. On the pool it is also the most items one flow run "
        "carries: small partitions and shards are packed together into runs of at most this many, at least "
        "one run per worker and a multiple of the worker count (deployments/README.md, Sizing). A run's "
        "items are its parameters, which Prefect caps at 512 KB (about 4,500 items): a pack is split "
        "further to stay under 400 KB.")
    dispatch_calls_per_s: float = Field(
        10, gt=0, le=1000,
        description="gpu_work_pool only: Prefect API calls per second of the dispatch (starting shard runs and "
        "polling them), all shards together and at most 4 at once, so a large night stays under the API's "
        "rate limits.")
    learn: LearnParams = Field(default_factory=LearnParams, description="Instruction learning.")
    apply: ApplyParams = Field(default_factory=ApplyParams, description="Applying instructions to the catalogue.")
    qc: QCConfig = Field(default_factory=QCConfig, description="Quality-check thresholds.")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Review gate before publishing.")

    @model_validator(mode="after")
    def _outputs_default_to_the_input_store(self) -> RefreshConfig:
        # Resolved once here, so every stage (and the run summary) names the same output root.
        if not self.output_uri:
            self.output_uri = self.store_uri
        return self


class PartitionJob(_Config):
    """Everything one partition's edit needs; small and JSON-ready, so it can travel as the parameters
    of a `refresh-partition` run on a GPU work pool."""

    store_uri: str = Field(description="Root holding the catalogue images.")
    output_uri: str = Field(description="Root for edited images, manifest and completion markers.")
    run_id: str = Field(description="The refresh run this partition belongs to.")
    partition: str = Field(description="Catalogue partition name (from the index).")
    items: list[dict] = Field(description="The partition's items: image_id, key, category.")
    instructions: dict[str, dict] = Field(description="category -> instruction record from learn_instructions.")
    model_uri: str | None = Field(None, description="Model folder; empty = the shipped model.")
    device: str = Field("cpu", description="torch device of the model step.")
    model_slot: str | None = Field(None, description="Prefect global concurrency limit around model calls.")
    apply: ApplyParams = Field(default_factory=ApplyParams, description="Applying the instructions.")
    qc: QCConfig = Field(default_factory=QCConfig, description="Quality-check thresholds.")


class PartitionPiece(_Config):
    """One piece of a night's editing: a whole partition (shard empty) or one shard of it. A pool run
    carries a pack of pieces (tasks/edit.py `pack_pieces`)."""

    job: PartitionJob = Field(description="The partition's work order (a shard's: its slice of the items).")
    shard: int | None = Field(None, ge=0, description="The shard's number; empty = the whole partition.")

    @property
    def label(self) -> str:
        return self.job.partition if self.shard is None else f"{self.job.partition} shard {self.shard}"
