"""Small files shipped with the package (the example scan)."""
from importlib import resources
from pathlib import Path


def example_scan() -> Path:
    """Path of the bundled example scan (a clinical FLAIR, CC-BY; see README.md)."""
    return Path(str(resources.files(__name__) / "example_flair.nii.gz"))
