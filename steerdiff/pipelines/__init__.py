"""diffusers pipelines."""

from .restoration import RestorationPipeline  # inverse problems (issue 6)
