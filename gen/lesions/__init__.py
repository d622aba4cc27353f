"""Injuries drawn into real healthy organ crops (``toolkit gen --mode lesion``): array in, array out.

Layout (one concept per module)::

    shapes.py       lesion masks inside an organ mask from shape priors per kind and grade
                    (RandLacerationMask, RandSubcapsularHematomaMask, ..., create_lesion_mask)
    fill.py         the procedural fill: organ-matched texture, configured or measured HU contrast
    pairs.py        which healthy crop gets which lesion: eligible_sources, choose_sources,
                    plan_lesions / training_plan -> LesionPlan; LesionSamples (the counterfactual record)
    backend.py      what lesion-mode generators share; inpaint_hu (HU in, HU out)
    inpaint.py      diffusion: RePaint with the class-conditional UNet ("diffusion", mode "lesion")
    nets.py         the inpainting generator network of the lesion GAN
    gan_inpaint.py  GAN: inpainting generator vs projection discriminator ("gan", mode "lesion")
    audit.py        realism two-sample AUC, lesion-vs-organ contrast, quality filter
    grid.py         healthy source | lesion mask | injured crop, side by side

Flow for one organ (crops ``hu`` (N, S, S) int16 with ``organ_masks`` (N, S, S), ``labels``,
``patients``, ``spacing`` (N,) mm/px; ``cfg`` the resolved Config)::

    rng = np.random.default_rng(cfg.seed)
    rows = choose_sources(eligible_sources(labels, organ_masks), n, rng)
    plan = plan_lesions(organ, organ_masks, rows, classes, class_names, rng, spacing, cfg.gen.lesion)
    # procedural
    out_hu = fill_lesions(hu[rows], organ_masks[rows], plan.lesion_masks, plan.kinds, rng, spacing[rows],
                          cfg.gen.lesion)
    # or a generator (trained on the organ crops, windowed with data.windows[0])
    gen = create_generator(cfg.gen.model, cfg.gen, n_classes, class_names, seed=cfg.seed, mode="lesion")
    gen.fit(windowed, labels, lesion_plan=training_plan(organ, labels, organ_masks, class_names, rng,
                                                        spacing, cfg.gen.lesion), checkpoint_dir=...)
    out_hu = inpaint_hu(gen, hu[rows], plan.lesion_masks, plan.classes, window, seed=cfg.seed)
    samples = LesionSamples(out_hu, plan, patients[rows], method=...)

Nothing here reads or writes files except ``grid.py`` (a PNG) and the generators' checkpoints.
"""
