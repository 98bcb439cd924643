"""Why do features transfer? Invariances, saliency maps, perceptual distances and deep-image-prior reconstructions.

Every analysis works for any model of the registry (2D and 3D) or a fine-tuned model card, reads its images through
the model's own preprocessing profile, and writes a folder with figures, a tidy CSV and ``summary.md``.
``medfm analyze …`` is :func:`medfm.analyze.cli.main`.
"""
