"""Bounding-box detection on any registered 2D trunk: box manifests, Faster R-CNN / RetinaNet with an FPN, mAP.

``boxes`` reads and checks box manifests (CSV, YOLO, COCO); ``model`` builds the detector on a trunk; ``data`` and
``module`` are the Lightning pieces of ``medfm detect fit``; ``metrics`` scores boxes (COCO matching, bootstrap);
``outputs`` writes a run's results and model card and runs a trained detector (``medfm detect predict``).
"""
