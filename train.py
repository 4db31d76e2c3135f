"""Train a classifier on noisily labelled data with ProSelfLC or a baseline target modification.

    python train.py                                   # digits on CPU, about 10 seconds
    accelerate launch train.py --method proselflc --dataset cifar100 --noise symmetric --noise-rate 0.4
    torchrun --nproc_per_node 2 train.py --cpu        # two CPU processes over gloo

Read it top to bottom: config, data, model, loss, prepare, loop, evaluate, save. Every default and check
lives in config.py, the run folder and checkpoints in runfolder.py, the label audit in audit.py. With no flags beyond the dataset a CIFAR run follows the paper's
recipe (Section 5.1): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256, 30,000 steps, lr / 10 at
50% and 73.3% of the steps; `--recipe imagenet|clothing1m` are the paper's photo experiments, and
`--print-config` shows the resolved values without running.
`--batch-size` is the global batch (all processes and accumulation steps together), so the recipe
is the same on one GPU or many.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin, gather_object, set_seed
from tqdm.auto import tqdm

import audit
import config
import data
import eval as ev
import hub
import losses
import models
import noise
import runfolder


def ran_precision(accelerator: Accelerator) -> str:
    """The mixed precision that actually runs: Accelerate runs fp16 on a CPU in fp32, so say so and record 'no'."""
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        if accelerator.is_main_process:
            print(
                f"note: --mixed-precision fp16 needs a GPU; on {accelerator.device.type} this run is fp32 and "
                f"config.json records 'no' (use bf16 for mixed precision on a CPU)",
                file=sys.stderr,
            )
        return "no"
    return accelerator.mixed_precision


def sync_running_targets(accelerator: Accelerator, loss_fn: losses.TrainingLoss, rows: torch.Tensor) -> None:
    """ELR: every process writes the rows its step updated into every copy, so all processes hold the same targets."""
    if accelerator.num_processes > 1:
        loss_fn.elr_targets[accelerator.gather(rows)] = accelerator.gather(loss_fn.elr_targets[rows])


def evaluate(run: Run, early: bool) -> dict:
    """Clean test accuracy/loss, the audit's statistics and, with known noise, the paper's Figure 3 metrics."""
    args, accelerator, info, b = run.args, run.accelerator, run.info, run.train_eval_batches
    logits = data.predict(run.model, run.test_batches, info, args.channels_last, accelerator.gather)
    metrics = ev.test_metrics(logits, run.test_batches.label) | {"test_examples": len(run.test_batches.label)}
    if b is None:
        return metrics
    logits = data.predict(run.model, b, info, args.channels_last, accelerator.gather)
    if run.dynamics is not None:
        run.dynamics.update(logits, b.label, b.index, early)
    if args.noise == "none" and not info.clean_subset:
        return metrics
    pred, ent, noisy = logits.argmax(1), losses.normalized_entropy(logits.float().softmax(1)), b.is_noisy
    mean = lambda x, mask: x[mask].float().mean().item() if mask.any() else float("nan")  # noqa: E731
    return metrics | {
        "clean_fit": mean(pred == b.label, ~noisy),
        "noisy_fit": mean(pred == b.label, noisy),
        "noisy_correct": mean(pred == b.clean_label, noisy),
        "entropy_clean": mean(ent, ~noisy),
        "entropy_noisy": mean(ent, noisy),
    }


FRESH_STATE = {"step": 0, "best_acc": -1.0, "best_step": 0, "loss_sum": 0.0, "eps_sum": 0.0, "n_sum": 0}


@dataclass
class Run:
    """What the stages of main() pass on: the configuration, the folder, the data, the model and its training state."""

    args: argparse.Namespace
    accelerator: Accelerator
    out: Path
    info: Any = None
    train_ds: Any = None
    test_batches: Any = None
    train_eval_batches: Any = None
    dynamics: audit.TrainingDynamics | None = None
    probe: audit.LinearProbe | None = None  # the audit's cross-entropy view of the features (training batches only)
    eval_keys: list[str] | None = None
    model: Any = None
    optimizer: Any = None
    loss_module: losses.TrainingLoss | None = None  # the uncompiled loss: its state (ELR's targets) is checkpointed
    loss_fn: Any = None
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=lambda: dict(FRESH_STATE))


def trainee(run: Run) -> runfolder.Trainee:
    """What a checkpoint of the run holds: model, optimizer, the loss's and the audit's tensors, config, counters."""
    own = {"loss": run.loss_module, "dynamics": run.dynamics, "probe": run.probe}
    own = {prefix: state for prefix, state in own.items() if state is not None}
    return runfolder.Trainee(run.model, run.optimizer, own, run.config, run.state)


def build_data(run: Run) -> None:
    """The test split clean and map-style; the training split noisy; the subset scored at evaluations and the
    label audit's statistics over it."""
    args, accelerator = run.args, run.accelerator
    run.train_ds, test_ds, run.info = data.prepare_data(vars(args))
    info = run.info
    args.input_path, args.resize, args.image_size = info.input_path, info.resize, info.image_size  # into config.json
    workers, rank, world = args.num_workers, accelerator.process_index, accelerator.num_processes
    eval_batch = max(1, args.eval_batch_size // world)  # per process, as the training batch
    run.test_batches = data.EvalBatches(
        test_ds, info, accelerator.device, eval_batch, rank=rank, world=world, workers=workers
    )
    eval_ds, rows = data.train_eval_subset(run.train_ds, args.train_eval_size)  # for the Figure 3 metrics
    if rows is not None:  # also without synthetic noise: the audit is for labels whose noise is unknown
        if info.clean_subset:
            accelerator.print(
                f"clean_fit/noisy_fit are measured on the {len(rows)} training examples with a known "
                "clean label (clean_label_kv.txt)"
            )
        run.train_eval_batches = data.EvalBatches(
            eval_ds, info, accelerator.device, eval_batch, rows, rank, world, workers
        )
        run.dynamics = audit.TrainingDynamics(
            data.label_tensors(eval_ds)["label"],
            info.num_classes,
            accelerator.device,
            args.audit_epochs,
            from_batches=not args.streaming,  # a stream's rows differ
            total_images=args.max_steps * args.batch_size,
        )
        run.eval_keys = list(eval_ds["example_key"]) if args.streaming else None  # a stream's subset by key


def build_model_and_loss(run: Run) -> None:
    """Model (SyncBatchNorm over several GPUs), SGD and the --method loss, prepared by Accelerate."""
    args, accelerator, info = run.args, run.accelerator, run.info
    set_seed(args.seed)
    args.model = args.model or models.default_model(args.dataset, info.image_size)
    model = models.build_model(args.model, info.num_classes, info.channels, weights=args.weights)
    if args.sync_bn:  # BatchNorm statistics over the global batch, as on one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if run.dynamics is not None and run.dynamics.from_batches:  # hooked before prepare: no model code changes
        run.probe = audit.LinearProbe(model, info.num_classes, accelerator.device)
        run.dynamics.keep_probe()
    num_examples = None
    if args.method == "elr":  # ELR's rows: the map-style split's rows, or a stream's --key-column ids
        num_examples = data.stream_num_rows(run.train_ds, args.key_column) if args.streaming else len(run.train_ds)
    run.loss_module = config.loss_from_args(args, info.num_classes, num_examples).to(accelerator.device)
    # the model is compiled by prepare (the accelerator's dynamo plugin); the loss is compiled here
    run.loss_fn = torch.compile(run.loss_module, mode=args.compile_mode) if args.compile else run.loss_module
    run.model, run.optimizer = accelerator.prepare(model, optimizer)  # evaluation batches are this process's own


def stop_if_diverged(run: Run, bad_step: torch.Tensor, step: int) -> None:
    """Raise FloatingPointError when any process saw a non-finite loss or the weights are no longer finite
    (one host sync), pointing to the last checkpoint (all are finite) with advice by what ran."""
    args, accelerator = run.args, run.accelerator
    weights_ok = torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()
    bad = torch.where(weights_ok | (bad_step >= 0), bad_step, step - 1)
    bad = accelerator.gather(bad.view(1)).max().item()
    if bad < 0:
        return
    last = runfolder.latest_checkpoint(run.out)
    advice = (
        "use --mixed-precision bf16 (fp16 overflows), or lower --lr"
        if args.mixed_precision == "fp16"
        else f"lower --lr (this run used {args.lr:g})"
    )
    resume = f"the last checkpoint, {last}, is finite" if last else "no checkpoint was saved before it"
    error = FloatingPointError(
        f"loss is not finite at step {bad} (training diverged): {advice}; {resume}; "
        f"nothing after it was saved or logged"
    )
    error.agreed = True  # every process raises it
    raise error


def evaluate_and_log(run: Run, step: int, lr: float, sums: torch.Tensor, batches) -> dict:
    """One line of metrics.jsonl: the training averages since the last one, then evaluate()."""
    args, accelerator, state = run.args, run.accelerator, run.state
    n = max(state["n_sum"], 1)
    loss_sum, eps_sum = sums.tolist()
    metrics = {"step": step, "lr": lr, "train_loss": loss_sum / n, "epsilon": eps_sum / n}
    early = run.dynamics is not None and run.dynamics.observes_evaluation(step, args.batch_size, args.eval_every)
    metrics |= evaluate(run, early)
    metrics["process_steps"] = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    metrics["bad_images"] = len(set(gather_object(sorted(batches.bad_files))))
    sums.zero_()
    state["n_sum"] = 0
    if metrics["test_acc"] > state["best_acc"]:
        state["best_acc"], state["best_step"] = metrics["test_acc"], step
    if accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    accelerator.log(metrics, step=step)
    accelerator.print(
        f"step {step}/{args.max_steps} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    )
    return metrics


def train_step(run: Run, batch: dict, t: int, sums: torch.Tensor, bad_step: torch.Tensor) -> torch.Tensor:
    """Optimizer step t on this process's batch (micro-batches under gradient accumulation): no device value is read."""
    args, accelerator, info = run.args, run.accelerator, run.info
    accum = args.gradient_accumulation_steps
    micro = data.process_batch(args.batch_size, accelerator.num_processes, accum)
    x = data.normalize(batch["image"], info.mean, info.std)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for xs, ys, rows in zip(x.split(micro), batch["label"].split(micro), batch["index"].split(micro)):
        with accelerator.accumulate(run.model):
            logits = run.model(xs)
            loss = run.loss_fn(logits, ys, step=t, index=rows)
            if run.dynamics is not None and run.dynamics.observes_step(t, args.batch_size):
                observed = (logits.detach(), rows) + ((run.probe.features, ys) if run.probe is not None else ())
                z, idx, *seen = accelerator.gather(observed)
                run.dynamics.observe(z, idx, run.probe.fit(*seen) if run.probe is not None else None)
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        eps = run.loss_module.last_epsilon
        sums[0] += loss.detach().float() / accum
        sums[1] += (eps.float().mean() if torch.is_tensor(eps) else eps) / accum
        bad_step = torch.where(torch.isfinite(loss.detach()) | (bad_step >= 0), bad_step, t)
    if args.method == "elr":
        sync_running_targets(accelerator, run.loss_module, batch["index"])
    return bad_step


def train_loop(run: Run) -> dict:
    """Steps t = state['step'] .. T-1 (t = ProSelfLC's optimizer steps taken); evaluation, checkpoints, progress,
    and a checkpoint at the step reached when SIGTERM, SIGUSR1 or SIGINT arrives. Returns the last metrics."""
    args, accelerator, state = run.args, run.accelerator, run.state
    device, milestones = accelerator.device, config.milestone_steps(args)
    batches = data.TrainBatches(
        run.train_ds,
        run.info,
        args.batch_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
        state["step"],
        device,
        num_workers=args.num_workers,
        max_bad_fraction=args.max_bad_fraction,
        key_column=args.key_column,
    )
    batch_iter = iter(batches)
    sums = torch.tensor([state["loss_sum"], state["eps_sum"]], device=device)  # train loss and eps since the last log
    bad_step, metrics = torch.tensor(-1, device=device), {}
    bar = tqdm(total=args.max_steps, initial=state["step"], disable=None if accelerator.is_local_main_process else True)
    tick, tick_step = time.perf_counter(), state["step"]
    run.model.train()
    for t in range(state["step"], args.max_steps):
        lr = config.lr_at(t, args.lr, args.max_steps, args.lr_schedule, milestones, args.poly_power)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        bad_step = train_step(run, next(batch_iter), t, sums, bad_step)
        state["n_sum"] += 1
        step = t + 1
        log_step = step % args.log_every == 0 or step == args.max_steps
        stop = runfolder.stop_requested(accelerator, log_step) and step < args.max_steps
        if (
            stop
            or step == args.max_steps
            or any(step % every == 0 for every in (args.log_every, args.eval_every, args.save_every))
        ):
            stop_if_diverged(run, bad_step, step)  # before anything is logged or saved
        if log_step:
            if run.dynamics is not None:
                run.dynamics.refresh()  # the audit window's end, decided on the device
            now = time.perf_counter()
            n, (loss_sum, eps_sum) = max(state["n_sum"], 1), sums.tolist()
            bar.set_postfix(
                loss=f"{loss_sum / n:.3f}",
                eps=f"{eps_sum / n:.3f}",
                lr=f"{lr:.3g}",
                img_s=f"{(step - tick_step) * args.batch_size / (now - tick):.0f}",
            )
            bar.update(step - bar.n)
            tick, tick_step = now, step
        if step % args.eval_every == 0 or step == args.max_steps:
            metrics = evaluate_and_log(run, step, lr, sums, batches)
        if (step % args.save_every == 0 or stop) and step < args.max_steps:
            state |= dict(zip(("loss_sum", "eps_sum"), sums.tolist()), step=step)
            runfolder.save_checkpoint(accelerator, trainee(run), run.out, step, args.keep_checkpoints)
        if stop:
            name = signal.Signals(runfolder.STOP["signal"] or signal.SIGTERM).name
            raise runfolder.Stopped(
                f"stopped by {name} at step {step}: checkpoint {run.out / 'checkpoints' / f'step_{step:06d}'} "
                "written; run the same command with --resume latest (or --resume auto) to continue"
            )
    bar.close()
    return metrics


def save_final(run: Run, metrics: dict) -> None:
    """The final model (the paper reports the final model, not the best one) and the audit's statistics, each
    written to a temporary file and renamed: model.safetensors, written last, marks the run finished."""
    accelerator, out = run.accelerator, run.out
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
        weights = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        try:
            if run.dynamics is not None:
                run.dynamics.save(out / "dynamics.safetensors", run.eval_keys)
            runfolder.save_tensors_atomic(weights, out / "model.safetensors")
        except OSError as e:
            error = runfolder.storage_error(e, out, "final model.safetensors")
    runfolder.agree(accelerator, error)
    if run.args.push_to_hub and accelerator.is_main_process:
        push(out, run.args.push_to_hub)
    accelerator.end_training()
    accelerator.print(
        f"final test_acc={metrics['test_acc']:.4f} best_test_acc={run.state['best_acc']:.4f} "
        f"(step {run.state['best_step']}) output_dir={out}"
    )


def push(out: Path, repo_id: str) -> None:
    """Push the finished run (hub.push_run), then record the success in the run folder (PUSH_RECORD)."""
    hub.push_run(out, repo_id)
    runfolder.write_atomic(out / runfolder.PUSH_RECORD, json.dumps({"repo_id": repo_id}))


def finished_again(args: argparse.Namespace, out: Path, accelerator: Accelerator) -> bool:
    """--resume auto on a finished run: refuse other settings than the run's; retry its push if --push-to-hub is
    given and no push to that repository succeeded. Whether a push was retried."""
    config.check_same_run(out, {k: v for k, v in config.planned_config(args).items() if k not in config.DATA_DECIDED})
    record = out / runfolder.PUSH_RECORD
    pushed = os.path.lexists(record) and runfolder.read_json(record, {"repo_id": runfolder.text})["repo_id"]
    if not args.push_to_hub or pushed == args.push_to_hub:
        return False
    if accelerator.is_main_process:
        push(out, args.push_to_hub)
    return True


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerate's view of the devices and processes; the values it decides go back into args."""
    dynamo = TorchDynamoPlugin(backend="inductor", mode=args.compile_mode or "default") if args.compile else None
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_dir=args.output_dir,
        dynamo_plugin=dynamo,
    )
    args.mixed_precision = ran_precision(accelerator)  # what runs, also when it came from the accelerate config
    args.sync_bn = config.check_processes(args, accelerator.num_processes, accelerator.device.type)
    if args.num_workers is None:
        args.num_workers = data.default_workers(accelerator.num_processes)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerator


def main(argv: list[str] | None = None) -> None:
    # ---- config: every value resolved and checked; nothing touched yet
    args = config.resolve(argv)
    if vars(args).pop("print_config"):  # what a recipe means, before paying for it: no data, no Accelerator
        print(json.dumps(config.planned_config(args), indent=2))
        return
    datasets.disable_progress_bars()  # the noise maps take a second; our own bar shows training
    accelerator = make_accelerator(args)
    if args.weights == "imagenet":  # download (once) or fail with one line before the data is loaded
        with accelerator.main_process_first():
            models.imagenet_state_dict(args.model)
    # ---- folder: locked; what to resume and whether to replace a run decided, nothing deleted yet
    out = Path(args.output_dir)
    try:
        ckpt, clear = runfolder.open_run_folder(out, args.resume, args.overwrite, accelerator)
    except runfolder.Finished:
        if not finished_again(args, out, accelerator):
            raise
        return
    if ckpt is not None:  # the same run: every hyperparameter known before the data loads
        config.check_same_run(
            ckpt, {k: v for k, v in config.planned_config(args).items() if k not in config.DATA_DECIDED}
        )
    run = Run(args, accelerator, out)
    # ---- data, model, loss
    build_data(run)
    build_model_and_loss(run)
    run.config = config.recorded_config(args, run.info, accelerator.num_processes, accelerator.device)
    if ckpt is not None:
        config.check_same_run(ckpt, run.config)
    record = (
        noise.noise_record(run.train_ds, run.info.noise, key_column=args.key_column)
        if accelerator.is_main_process
        else {}
    )
    if ckpt is not None:  # every file checked whole against this run before it loads, and before any write
        runfolder.load_checkpoint(accelerator, trainee(run), ckpt)
    runfolder.start_run_folder(
        out, run.config, record, clear, run.state["step"] if ckpt else None, accelerator
    )  # the first write, after every check
    if args.report_to:
        accelerator.init_trackers(
            "proselflc", config={k: v for k, v in run.config.items() if isinstance(v, (int, float, str, bool))}
        )
    # ---- loop, save
    runfolder.STOP["training"] = True
    metrics = train_loop(run)
    save_final(run, metrics)


def cli(argv: list[str] | None = None) -> int:
    """main() behind the one CLI wrapper: bad input is one 'error: ...' line and exit 2, a stop signal runfolder.stop_code."""
    return runfolder.run_cli(lambda: main(argv))


atexit.register(runfolder.release_locks)  # also when main() is called without cli()

if __name__ == "__main__":
    for (
        stop_signal
    ) in runfolder.STOP_SIGNALS:  # preemption or Ctrl-C: checkpoint, then exit 143 or 130 (on_stop_signal)
        signal.signal(stop_signal, runfolder.on_stop_signal)
    runfolder.leave(cli())
