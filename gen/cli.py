"""``toolkit gen``: train per-organ class-conditional generators and write audited synthetic slices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli_common import (
    ConfigOpt,
    ConsoleReporter,
    ForceOpt,
    SeedOpt,
    SetOpt,
    WorkdirOpt,
    console,
    handle_errors,
    setup,
)
from toolkit.errors import ToolkitError

ORGAN_HELP = "Organ to generate: bowel, extravasation, kidney, liver, spleen, or all (skips finished organs)."


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the ``toolkit`` app."""
    app.command("gen")(gen)


@handle_errors
def gen(
    organ: Annotated[str, typer.Option("--organ", help=ORGAN_HELP)],
    workdir: WorkdirOpt = Path("."),
    config: ConfigOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Generator: diffusion (default, best) or gan (fast on a CPU)."),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", help="image: whole generated slices/crops (default) | lesion: injuries drawn into real "
                     "healthy training crops (gen.lesion.fill procedural or model)."),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="Synthetic slices to write, split evenly over classes.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (gen.train_steps).")] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Pixels per side of generated slices (gen.image_size).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted training from synthetic/<organ>/checkpoint/."),
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Train a class-conditional generator per organ on the store's TRAIN patients and write synthetic slices.

    Each organ gets its own generator, conditioned on healthy/injured (or healthy/low/high with
    --set gen.conditioning=grade). Kidney, liver and spleen learn their organ crops (store/crops/<organ>/,
    `toolkit crop`; classes from the crops' hard labels), bowel and extravasation the stored slices;
    --set gen.input=slices makes every organ learn slices. Test patients are never used.
    Output: synthetic/<organ>/ with a slice set (int16 HU, split "synthetic"), grid.png (real vs
    synthetic), audit.json (Frechet distance, HU histogram, diversity, near-copies of training slices,
    which the trainer leaves out), loss.csv, train_patients.csv, config.yaml and a resumable checkpoint/.

    --mode lesion draws injuries (laceration, hematoma, infarct...) into healthy TRAINING crops of kidney, liver
    or spleen inside their organ mask: procedural fill by default, --set gen.lesion.fill=model for the
    backend's inpainting; writes the injured crops with their source crop and lesion mask (counterfactual
    pairs), grid.png (source | mask | injured) and audit.json (realism AUC, contrast, filter, near copies).

    Examples: toolkit gen -w ws --organ liver | toolkit gen -w ws --organ all --model gan --n 1000 |
    toolkit gen -w ws --organ liver --mode lesion
    """
    from gen.data import check_organ
    from gen.run import generate, generate_all

    if organ != "all":
        check_organ(organ)
    ws, cfg = setup(
        workdir,
        config,
        sets,
        {"gen": {"model": model, "mode": mode, "train_steps": steps, "image_size": image_size}},
        seed,
    )
    if organ == "all":
        results = generate_all(ws, cfg, n=n, resume=resume, force=force, reporter=ConsoleReporter())
        failed = []
        for name, result in results.items():
            if result["status"] == "failed":
                failed.append(name)
                console.print(f"[red]{name}: failed[/]: {result['error']}")
            else:
                console.print(f"{name}: {result['status']} -> {result['path']}\n  audit: {result['audit']}")
        if failed:
            raise ToolkitError(f"gen failed for {', '.join(failed)} (reasons above); the other organs are written")
        return
    out = generate(ws, cfg, organ, n=n, resume=resume, force=force, reporter=ConsoleReporter())
    import json

    summary = json.loads((out / "audit.json").read_text())["summary"]
    written = "lesion crops + masks" if cfg.gen.mode == "lesion" else "slices"
    extra = "" if cfg.gen.mode == "lesion" and cfg.gen.lesion.fill == "procedural" else ", loss.csv, checkpoint/"
    console.print(f"wrote {out} ({written}, grid.png, audit.json{extra})\naudit: {summary}")
