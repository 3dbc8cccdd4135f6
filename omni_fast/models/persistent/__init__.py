"""The MTP frame as one persistent kernel launch: schedule builder + checker (:mod:`.schedule`) and the runner
(:mod:`.frame`). See docs/persistent.md."""

from .frame import PersistentError, PersistentFrame, co_resident_grid
from .reset import reset_persistent
from .schedule import FrameShape, Item, Schedule, ScheduleError, build_frame, check_schedule

__all__ = ["FrameShape", "Item", "Schedule", "ScheduleError", "build_frame", "check_schedule", "PersistentFrame",
           "PersistentError", "co_resident_grid", "reset_persistent"]
