"""flowerbed: federated learning for hospitals, built on Flower."""

__version__ = "0.1.0"
