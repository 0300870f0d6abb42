"""Deployment: robot protocol, simulated real-time robot, timestamped action queue, control loop, export."""

from ..action_queue import ActionQueue
from .robot import ObservationError, Robot, check_spec, validate_observation
from .sim_robot import SimRobot

__all__ = ["ActionQueue", "ObservationError", "Robot", "SimRobot", "check_spec", "validate_observation"]
