"""Tasks (what is learned and how it is scored); importing this package registers the datasets."""

from hetfl.tasks import instruct  # noqa: F401
from hetfl.tasks import classify  # noqa: F401
from hetfl.tasks import news_bow, regression  # noqa: F401
