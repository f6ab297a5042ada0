"""Several processes: starting them, which rank does what, and how the Trainer spreads the work.

`pigg train --gpus 0,1,2,3` (and `pigg eval`) starts one process per GPU through torch's own launcher
(`python -m torch.distributed.run`, what `torchrun` runs), then each process runs the same pigg
command. A command that finds itself under a launcher (WORLD_SIZE set: torchrun, srun + torchrun,
pigg's own relaunch) just runs, so every way of starting a run is the same run.

Training: LoRA uses DDP (each GPU holds the whole model; only the ~22M adapter gradients are
averaged), full fine-tuning uses FSDP2 (parameters, gradients and AdamW state sharded over the GPUs:
the 8B model's ~66 GB of them, which leave one GPU room for little more than micro-batch 1 with
recomputation, become ~33 GB on each of 2 GPUs). The effective batch stays `train.effective_batch`
whatever the process count (pigg.model.batch_plan).
"""
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


def world_size(env=os.environ) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def rank(env=os.environ) -> int:
    return int(env.get("RANK", "0"))


def local_rank(env=os.environ) -> int:
    return int(env.get("LOCAL_RANK", "0"))


def is_main(env=os.environ) -> bool:
    """Rank 0 writes the shared files (weights, configs, logs, metrics); the others only compute."""
    return rank(env) == 0


def under_launcher(env=os.environ) -> bool:
    return "WORLD_SIZE" in env


# ---- starting the processes -------------------------------------------------------------------

@dataclass
class Launch:
    """How many processes a command asks for (the CLI's --gpus, --nproc, --nnodes, --rdzv-*)."""
    gpus: str | None = None
    nproc: int | None = None
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str = "pigg"

    def processes_per_node(self) -> int:
        if self.gpus is not None:
            return len(parse_gpus(self.gpus))
        return self.nproc or 1


def parse_gpus(text: str) -> list[str]:
    gpus = [g for g in text.replace(" ", "").split(",") if g]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus must be GPU indices like 0 or 0,1,2,3, got {text!r}")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus names a GPU twice: {text!r}")
    return gpus


def check_launch(launch: Launch) -> None:
    """Every problem with the launch flags at once."""
    problems = []
    if launch.gpus is not None:
        try:
            parse_gpus(launch.gpus)
        except ValueError as e:
            problems.append(str(e))
        if launch.nproc is not None:
            problems.append("give --gpus (one process per GPU) or --nproc (CPU processes), not both")
    if launch.nproc is not None and launch.nproc < 1:
        problems.append(f"--nproc must be >= 1, got {launch.nproc}")
    if launch.nnodes < 1:
        problems.append(f"--nnodes must be >= 1, got {launch.nnodes}")
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        problems.append("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address, the same on "
                        "every node)")
    if problems:
        raise ValueError("; ".join(problems))


def visible_devices(launch: Launch) -> str | None:
    """CUDA_VISIBLE_DEVICES for the processes (None: leave it as it is)."""
    if launch.gpus is not None:
        return ",".join(parse_gpus(launch.gpus))
    if launch.nproc is not None:
        return ""  # --nproc means CPU processes, even on a GPU machine
    return None


def launch_environment(launch: Launch, env=os.environ, cpu_count: int | None = None) -> dict:
    """Environment changes for the processes: the GPUs they may see and threads per process."""
    changes = {}
    visible = visible_devices(launch)
    if visible is not None:
        changes["CUDA_VISIBLE_DEVICES"] = visible
    if "OMP_NUM_THREADS" not in env:
        # torchrun would set 1; on CPU that leaves cores idle, on GPU a few threads help the collators
        changes["OMP_NUM_THREADS"] = str(max(1, (cpu_count or os.cpu_count() or 1) // launch.processes_per_node()))
    return changes


def launcher_command(pigg_argv: list[str], launch: Launch, python: str = sys.executable,
                     env=os.environ) -> list[str] | None:
    """The torch.distributed.run command that runs `pigg <pigg_argv>` once per process, or None when this
    process should run the command itself (one process, or already under a launcher)."""
    check_launch(launch)
    if under_launcher(env) or (launch.processes_per_node() == 1 and launch.nnodes == 1):
        return None
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(launch.processes_per_node())]
    if launch.nnodes == 1:
        cmd += ["--standalone"]  # a rendezvous on a free local port: runs side by side do not collide
    else:
        cmd += ["--nnodes", str(launch.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint,
                "--rdzv-id", launch.rdzv_id]
    # The children get the same arguments; under the launcher they run instead of launching again.
    return cmd + ["-m", "pigg.cli", *pigg_argv]


def relaunch(cmd: list[str], env_changes: dict) -> None:
    """Replace this process by the launcher, so that Ctrl-C, Slurm's signals and the exit code
    reach torchrun directly."""
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_changes.items())
    print(f"pigg: launching the processes: {shown} {shlex.join(cmd)}", flush=True)
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **env_changes})


def select_gpus(launch: Launch, env=os.environ) -> None:
    """In the process that does the work: --gpus / --nproc decide the visible devices (before CUDA starts)."""
    visible = visible_devices(launch)
    if visible is None:
        return
    env["CUDA_VISIBLE_DEVICES"] = visible
    on_node = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if launch.gpus is not None and on_node > len(parse_gpus(launch.gpus)):
        raise ValueError(f"the launcher started {on_node} processes on this node but --gpus {launch.gpus} names "
                         f"{len(parse_gpus(launch.gpus))} GPU(s): one process per GPU")


def use_local_gpu(env=os.environ) -> None:
    """Each process works on its own GPU (LOCAL_RANK), before any model or tensor is put on `cuda`."""
    import torch

    if torch.cuda.is_available() and under_launcher(env):
        torch.cuda.set_device(local_rank(env))


# ---- training: DDP or FSDP ----------------------------------------------------------------------

def strategy(train_cfg, world: int) -> str:
    """'single', 'ddp' or 'fsdp' for this run (train.distributed, resolved for the process count)."""
    if world == 1:
        return "single"
    if train_cfg.distributed == "auto":
        return "fsdp" if train_cfg.method == "full" else "ddp"
    return train_cfg.distributed


def wrap_classes(model) -> list[str]:
    """The blocks FSDP shards and gathers one at a time: the decoder layers and the vision blocks
    (transformers lists them as the modules never split across devices)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return sorted(names & present)


def trainer_arguments(how: str, model) -> dict:
    """Extra TrainingArguments for `strategy()`'s answer."""
    if how == "ddp":
        # Every trainable parameter (LoRA or the whole LLM) gets a gradient at every step and the frozen
        # vision tower has none to sync, so DDP need not search the graph for unused parameters.
        return dict(ddp_find_unused_parameters=False)
    if how == "fsdp":
        return dict(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": wrap_classes(model),
                # Checkpoints hold whole (unsharded) weights and optimizer state: they resume on any
                # number of GPUs and the final save is one ordinary model.safetensors.
                "state_dict_type": "FULL_STATE_DICT",
                "reshard_after_forward": True,
            },
            # Reduce-scatter after every micro-batch: skipping it during accumulation (as DDP does)
            # would keep a whole unsharded copy of the gradients on every GPU (16 GB for the 8B model).
            accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}},
        )
    return {}


def describe(how: str, world: int, model=None) -> str:
    if how == "single":
        return "one process"
    if how == "ddp":
        return f"DDP over {world} processes (each holds the whole model; gradients averaged)"
    return (f"FSDP2 over {world} processes (weights, gradients and optimizer state sharded; "
            f"units: {', '.join(wrap_classes(model)) if model is not None else 'decoder layers'})")


# ---- evaluation: barriers ------------------------------------------------------------------------

def start_process_group() -> bool:
    """A process group for evaluation's barriers (gloo: it needs no GPU); True if this call made it."""
    import datetime

    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return False
    # Ranks wait for each other only at the start and the end; generous, as one share can run long.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def end_process_group(made_here: bool) -> None:
    if made_here:
        close_process_group()


def close_process_group() -> None:
    """The process group of this process (training's, which accelerate makes), destroyed once a command
    has succeeded: left to the interpreter's exit, gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception") after its work is done and saved, and the run's
    launcher then reports it failed. Not after an error: a rank that failed while others are in a
    collective would wait for them in the destroy."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- resuming a checkpoint written with another layout (one process or DDP <-> FSDP) -----------
# A full fine-tuning checkpoint written under FSDP holds pytorch_model_fsdp.bin and optimizer.bin (the
# optimizer state keyed by parameter name); one written by one process (or DDP) holds optimizer.pt
# (keyed by position). Both hold the whole weights as model.safetensors. The Trainer reads only its own
# layout, so a run that resumes on a different number of GPUs converts here.

FSDP_WEIGHTS, FSDP_OPTIMIZER, PLAIN_OPTIMIZER = "pytorch_model_fsdp.bin", "optimizer.bin", "optimizer.pt"


def written_with_fsdp(checkpoint) -> bool:
    return (Path(checkpoint) / FSDP_WEIGHTS).is_file()


def full_weights(checkpoint) -> dict:
    """The consolidated weights of a checkpoint (model.safetensors, or its shards)."""
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors to resume from: a LoRA run resumes only with the "
                                "train.distributed setting it was written with")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


def load_weights_across_layouts(model, checkpoint, into_fsdp: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if into_fsdp:  # rank 0 reads the file, the others receive their shards from it
        state = full_weights(checkpoint) if is_main() else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(full_weights(checkpoint), strict=True)


def parameter_names(model, optimizer) -> list[list[str]]:
    """The name of every parameter the optimizer holds, group by group, in its order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def by_name(saved: dict, names: list[list[str]], where) -> dict:
    """A position-keyed optimizer state (optimizer.pt) keyed by parameter name instead."""
    saved_sizes, sizes = [len(g["params"]) for g in saved["param_groups"]], [len(g) for g in names]
    if saved_sizes != sizes:
        raise ValueError(f"{where}: the optimizer state does not match this model's trainable parameters "
                         f"({saved_sizes} vs {sizes} per group)")
    state, groups = {}, []
    for group, group_names in zip(saved["param_groups"], names):
        groups.append({**group, "params": group_names})
        state.update({name: saved["state"][i] for i, name in zip(group["params"], group_names) if i in saved["state"]})
    return {"state": state, "param_groups": groups}


def by_position(saved: dict, names: list[list[str]], where) -> dict:
    """A name-keyed optimizer state (FSDP's optimizer.bin) in the layout `optimizer.load_state_dict` takes."""
    if [sorted(g["params"]) for g in saved["param_groups"]] != [sorted(g) for g in names]:
        raise ValueError(f"{where}: the optimizer state names other parameters than this model trains")
    state, groups, position = {}, [], 0
    for group, group_names in zip(saved["param_groups"], names):
        ids = list(range(position, position + len(group_names)))
        position += len(group_names)
        groups.append({**group, "params": ids})
        state.update({i: saved["state"][name] for i, name in zip(ids, group_names) if name in saved["state"]})
    return {"state": state, "param_groups": groups}


def load_optimizer_across_layouts(model, optimizer, checkpoint, into_fsdp: bool) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    folder = Path(checkpoint)
    names = parameter_names(model, optimizer)
    if into_fsdp:
        saved = {}
        if is_main():
            saved = by_name(torch.load(folder / PLAIN_OPTIMIZER, map_location="cpu", weights_only=True), names,
                            folder / PLAIN_OPTIMIZER)
        set_optimizer_state_dict(model, optimizer, saved,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        saved = torch.load(folder / FSDP_OPTIMIZER, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(by_position(saved, names, folder / FSDP_OPTIMIZER))
