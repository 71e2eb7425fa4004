"""The standard training framework: compile / fit / evaluate / predict for any torch module."""

from alloy.callbacks import Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint
from alloy.data import LabelEncoder, read_table
from alloy.framework.model import History, Model
from alloy.framework.registry import Metric

__all__ = ["Callback", "EarlyStopping", "History", "LabelEncoder", "LearningRateScheduler", "Metric", "Model",
           "ModelCheckpoint", "read_table"]
