"""Scripted bimanual expert for TwoArmTransport (privileged object poses) and demonstration generation.

Plan (the two arms work in parallel, each a small state machine of pose targets):

* robot0: lift the start-bin lid by its handle and set it down on table 0 beside the bin; pick the hammer by
  the robot0 half of its handle (5.5 cm from the handle centre, fingers across the handle); carry it to the
  handover point above the gap between the tables (y ~ 0) with the handle along world y; wait until robot1
  holds it; open; retreat.
* robot1: pick the trash cube out of the target bin and drop it into the trash bin; hover above the handover
  point; grasp the other half of the handle (11 cm from robot0's fingers); after robot0 let go, carry the hammer
  over the target bin, lower it and open.

Every move goes to a hover point first and descends vertically. Every grasp is checked after the fingers have
settled (width stopped changing) with the env's finger-pad contact test, and again after lifting (object went
up); a failed grasp re-opens, backs off and retries from the live object pose. Robot0 never opens on the hammer
before robot1's grasp is confirmed.

Actions are world-frame OSC deltas (the env's controller uses ``input_ref_frame="world"``, as data recorded
with robosuite <= 1.4): 2 x [dpos/0.05 m, drot/0.5 rad, gripper], in [-1, 1]. For an absolute-action env the same
command is converted to the absolute goal pose (pos, rot6d, gripper) the delta controller would have set.
``action_noise`` adds N(0, sigma^2) to all 14 normalised dims (then clips to [-1, 1]) - a robustness test and a
way to widen the demonstration distribution.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from shortcut_policy.conventions import TEST_SEED_START
from shortcut_policy.datasets.robomimic import (
    RobomimicHdf5Writer,
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_rot6d,
    robomimic_to_replay_buffer,
)
from shortcut_policy.envs.transport import IMAGE_KEYS, LOWDIM_CONCAT_KEYS, LOWDIM_SHAPES, TransportEnv, default_env_meta
from shortcut_policy.utils import atomic_write_text

POS_SCALE = 0.05  # m per unit of normalised action (OSC output_max)
ROT_SCALE = 0.5  # rad per unit
OPEN, CLOSE = -1.0, 1.0

# hand-down grasp orientations of the grip site (columns: site x = finger closing axis, y, z = approach dir)
_R_DOWN0 = np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])  # robot0's neutral (x along -world x)
_R_DOWN1 = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # robot1's neutral


def _rotz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotvec(R: np.ndarray) -> np.ndarray:
    """Rotation vector of a rotation matrix (log map)."""
    return Rotation.from_matrix(R).as_rotvec()


def _yaw_aligned(R_neutral: np.ndarray, yaw: float, period: float) -> np.ndarray:
    """R_neutral rotated about world z by yaw + k*period, k picked to keep the rotation smallest."""
    a = (yaw + period / 2) % period - period / 2
    return _rotz(a) @ R_neutral


def find_transport_env(env):
    """The TransportEnv inside (possibly) wrapped envs."""
    e, seen = env, 0
    while not isinstance(e, TransportEnv):
        seen += 1
        nxt = getattr(e, "env", None)
        if nxt is None or seen > 20:
            raise TypeError(f"TransportExpert needs a TransportEnv (or a wrapper of one), got {type(env).__name__}")
        e = nxt
    return e


@dataclass
class _Arm:
    idx: int
    phase: str = "start"
    t_phase: int = 0
    retries: dict = field(default_factory=dict)
    target_pos: np.ndarray | None = None
    target_R: np.ndarray | None = None
    grip: float = OPEN
    widths: list = field(default_factory=list)
    aux: dict = field(default_factory=dict)

    def go(self, phase: str):
        self.phase = phase
        self.t_phase = 0
        self.widths = []


class TransportExpert:
    """``TransportExpert(seed, action_noise=0.0).reset(env)``; ``.act(env) -> action`` (14 delta or 20 abs)."""

    # geometry / tuning
    HOVER = 0.10  # hover height above a grasp point
    GRASP_GAP = 0.11  # distance between robot0's and robot1's grasp points on the handle
    HO_PITCH = np.deg2rad(35)  # robot1's handover grasp: fingers tilted toward -y (less arm extension)
    LIFT_Z = 1.10  # carry height (bin walls end at ~0.95)
    HANDOVER = np.array([0.0, -0.055, 1.08])  # robot0 grip site at handover
    LID_DROP = np.array([-0.17, -0.35])  # where the lid goes (table 0, beside the start bin)
    LID_Z = 0.90  # grip-site height at which the lid is let go
    MAX_RETRIES = 6

    def __init__(self, seed: int = 0, action_noise: float = 0.0, verbose: bool = False):
        self.seed = int(seed)
        self.action_noise = float(action_noise)
        self.verbose = verbose
        self.rng = np.random.default_rng(self.seed)
        self.t = 0
        self.arms = [_Arm(0), _Arm(1)]
        self.events: list[tuple[int, int, str]] = []
        self.last_clean: np.ndarray | None = None  # the last command before noise (act_delta)

    # ------------------------------------------------------------------ env access
    def reset(self, env) -> "TransportExpert":
        self.rng = np.random.default_rng(self.seed)
        self.t = 0
        self.arms = [_Arm(0), _Arm(1)]
        self.events = []
        self._bind(env)
        return self

    def _bind(self, env):
        self.tenv = find_transport_env(env)
        self.rs = self.tenv.env  # robosuite env (rebuilt on hard resets, so re-read every step)

    @property
    def sim(self):
        return self.rs.sim

    def _site(self, i: int):
        ctrl = self.rs.robots[i].part_controllers["right"]
        sid = self.sim.model.site_name2id(ctrl.ref_name)
        return np.array(self.sim.data.site_xpos[sid]), np.array(self.sim.data.site_xmat[sid]).reshape(3, 3)

    def _width(self, i: int) -> float:
        r = self.rs.robots[i]
        idx = r._ref_gripper_joint_pos_indexes["right"]
        g = self.sim.data.qpos[idx]
        return float(abs(g[0] - g[1]))

    def _grasping(self, i: int, geoms) -> bool:
        return bool(self.rs._check_grasp(gripper=self.rs.robots[i].gripper["right"], object_geoms=geoms))

    # object poses
    def _body_pose(self, name: str):
        bid = self.sim.model.body_name2id(name)
        return np.array(self.sim.data.body_xpos[bid]), np.array(self.sim.data.body_xmat[bid]).reshape(3, 3)

    def _hammer(self):
        tr = self.rs.transport
        pos, R = self._body_pose(tr.payload.root_body)
        axis = R[:, 2]  # handle axis
        return pos, axis

    def _hammer_grasp_point(self, arm: int):
        """Handle point for robot ``arm`` (robot0: the -y part, robot1: the +y part) and the handle yaw.

        The hammer's centre of mass sits ~5 cm from the handle centre toward the head, and a grasp far from it
        lets the hammer pivot about the finger axis. The two grasps are ``GRASP_GAP`` apart (hands must not
        collide) and placed as close to the centre of mass as that allows: head toward +y -> robot0 at -3 cm,
        robot1 at +8 cm (next to the head); head toward -y -> robot0 at -5 cm (at the centre of mass), robot1
        at +6 cm."""
        pos, axis = self._hammer()
        head_pos_y = axis[1] >= 0  # body z points from the handle centre toward the head
        a = axis if head_pos_y else -axis  # pointing toward +y
        o0 = -0.03 if head_pos_y else -0.05
        off = o0 if arm == 0 else o0 + self.GRASP_GAP
        p = pos + off * a
        yaw = np.arctan2(-a[0], a[1])  # rotation of the handle from world y about z
        return p, yaw, pos

    def _lid_handle(self):
        tr = self.rs.transport
        gid = tr.lid_handle_geom_ids[0]
        return np.array(self.sim.data.geom_xpos[gid]), np.array(self.sim.data.geom_xmat[gid]).reshape(3, 3)

    def _trash(self):
        return self._body_pose(self.rs.transport.trash.root_body)

    # ------------------------------------------------------------------ control primitives
    def _cmd(self, i: int, pos, R, grip, vmax: float = 1.0):
        p, Rc = self._site(i)
        dp = (np.asarray(pos) - p) / POS_SCALE
        n = np.linalg.norm(dp)
        if n > vmax:
            dp *= vmax / n
        dr = _rotvec(np.asarray(R) @ Rc.T) / ROT_SCALE
        dr = np.clip(dr, -1.0, 1.0)
        return np.concatenate([np.clip(dp, -1, 1), dr, [grip]])

    def _at(self, i: int, pos, R, tol=0.01, rtol=0.08) -> bool:
        p, Rc = self._site(i)
        return np.linalg.norm(np.asarray(pos) - p) < tol and np.linalg.norm(_rotvec(np.asarray(R) @ Rc.T)) < rtol

    def _settled(self, arm: _Arm, i: int, min_steps: int = 8) -> bool:
        arm.widths.append(self._width(i))
        if len(arm.widths) < min_steps:
            return False
        return abs(arm.widths[-1] - arm.widths[-3]) < 2e-4

    def _descend(self, arm: _Arm, i: int, grasp, R, nxt: str, key: str, back: str, vmax=0.4, timeout=60):
        """Vertical approach: fix x/y at the current height first, then go down to the grasp pose."""
        p, _ = self._site(i)
        exy = np.linalg.norm(p[:2] - grasp[:2])
        tgt = np.array([grasp[0], grasp[1], p[2]]) if exy > 0.02 and p[2] > grasp[2] + 0.015 else grasp
        if self._at(i, grasp, R, tol=0.006, rtol=0.1) or arm.t_phase > timeout:
            if exy > 0.015:
                self._retry(arm, key, back)
            else:
                arm.go(nxt)
        return self._cmd(i, tgt, R, OPEN, vmax=vmax)

    def _log(self, i, msg):
        self.events.append((self.t, i, msg))
        if self.verbose:
            print(f"t={self.t:4d} robot{i}: {msg}")

    def _retry(self, arm: _Arm, key: str, phase: str) -> None:
        arm.retries[key] = arm.retries.get(key, 0) + 1
        self._log(arm.idx, f"retry {key} #{arm.retries[key]}")
        if arm.retries[key] > self.MAX_RETRIES:
            arm.go("give_up")
        else:
            arm.go(phase)

    # ------------------------------------------------------------------ robot0
    def _robot0(self) -> np.ndarray:
        a = self.arms[0]
        a.t_phase += 1
        p, Rc = self._site(0)
        ph = a.phase
        if ph == "start":
            a.go("lid_hover")
            ph = a.phase
        if ph in ("lid_hover", "lid_descend", "lid_close", "lid_lift"):
            hp, hR = self._lid_handle()
            yaw = np.arctan2(hR[1, 0], hR[0, 0])
            if ph in ("lid_hover", "lid_descend"):
                a.aux["g"] = (hp + np.array([0, 0, 0.004]), _yaw_aligned(_R_DOWN0, yaw, np.pi))
            grasp, R = a.aux["g"]  # frozen from closing on (the object moves with the hand)
            if ph == "lid_hover":
                tgt = grasp + np.array([0, 0, self.HOVER])
                if self._at(0, tgt, R, tol=0.015, rtol=0.1) or a.t_phase > 80:
                    a.go("lid_descend")
                return self._cmd(0, tgt, R, OPEN)
            if ph == "lid_descend":
                return self._descend(a, 0, grasp, R, "lid_close", "lid_align", "lid_hover", vmax=0.4)
            if ph == "lid_close":
                if self._settled(a, 0) or a.t_phase > 40:
                    if self._grasping(0, self.rs.transport.lid.handle_geoms):
                        a.aux["lid_z0"] = hp[2]
                        a.go("lid_lift")
                    else:
                        self._retry(a, "lid_grasp", "lid_reopen")
                return self._cmd(0, grasp, R, CLOSE)
            if ph == "lid_lift":
                tgt = np.array([grasp[0], grasp[1], self.LIFT_Z]) if a.t_phase == 1 else a.aux["lift_tgt"]
                a.aux["lift_tgt"] = tgt
                if p[2] > self.LIFT_Z - 0.03:
                    if hp[2] > a.aux["lid_z0"] + 0.05:
                        a.go("lid_move")
                    else:
                        self._retry(a, "lid_lift", "lid_reopen")
                elif a.t_phase > 60:
                    self._retry(a, "lid_lift", "lid_reopen")
                return self._cmd(0, tgt, R, CLOSE, vmax=0.8)
        if ph == "lid_reopen":  # open, back off upward, then start over from the live handle pose
            if a.t_phase > 12:
                a.go("lid_hover")
            return self._cmd(0, p + np.array([0, 0, 0.03 if a.t_phase > 6 else 0.0]), Rc, OPEN)
        if ph == "lid_move":
            tgt = np.array([self.LID_DROP[0], self.LID_DROP[1], self.LIFT_Z])
            if not self._grasping(0, self.rs.transport.lid.handle_geoms):
                self._log(0, "lid dropped while moving")  # wherever it fell, it is off the bin or we re-grasp
                if self._lid_on_start_bin():
                    self._retry(a, "lid_lift", "lid_reopen")
                else:
                    a.go("ham_hover")
                return self._cmd(0, p, Rc, OPEN)
            if self._at(0, tgt, Rc, tol=0.02, rtol=1.0) or a.t_phase > 90:
                a.go("lid_lower")
            return self._cmd(0, tgt, self._lid_R(), CLOSE, vmax=1.0)
        if ph == "lid_lower":
            tgt = np.array([self.LID_DROP[0], self.LID_DROP[1], self.LID_Z])
            if p[2] < tgt[2] + 0.012 or a.t_phase > 50:
                a.go("lid_release")
            return self._cmd(0, tgt, self._lid_R(), CLOSE, vmax=0.8)
        if ph == "lid_release":
            if a.t_phase > 8:
                a.go("lid_clear")
            return self._cmd(0, p, Rc, OPEN)
        if ph == "lid_clear":
            tgt = np.array([p[0], p[1], self.LIFT_Z])
            if p[2] > 1.0 or a.t_phase > 30:
                a.go("ham_hover")
            return self._cmd(0, tgt, Rc, OPEN)
        if ph in ("ham_hover", "ham_descend", "ham_close", "ham_lift"):
            gp, yaw, hpos = self._hammer_grasp_point(0)
            if ph in ("ham_hover", "ham_descend"):
                a.aux["g"] = (gp + np.array([0, 0, 0.002]), _yaw_aligned(_R_DOWN0, yaw, np.pi))
            grasp, R = a.aux["g"]
            if ph == "ham_hover":
                tgt = np.array([gp[0], gp[1], max(gp[2] + self.HOVER, 1.02)])
                # come in high first when far away (the bin walls)
                if np.linalg.norm(p[:2] - tgt[:2]) > 0.05 and p[2] < 1.0:
                    tgt2 = np.array([p[0], p[1], 1.05])
                    return self._cmd(0, tgt2, R, OPEN)
                if self._at(0, tgt, R, tol=0.012, rtol=0.08) or a.t_phase > 100:
                    a.go("ham_descend")
                return self._cmd(0, tgt, R, OPEN)
            if ph == "ham_descend":
                return self._descend(a, 0, grasp, R, "ham_close", "ham_align", "ham_hover", vmax=0.4)
            if ph == "ham_close":
                if self._settled(a, 0) or a.t_phase > 40:
                    if self._grasping(0, self.rs.transport.payload.handle_geoms):
                        a.aux["ham_z0"] = hpos[2]
                        a.go("ham_lift")
                    else:
                        self._retry(a, "ham_grasp", "ham_reopen")
                return self._cmd(0, grasp, R, CLOSE)
            if ph == "ham_lift":
                if a.t_phase == 1:
                    a.aux["lift_tgt"] = np.array([p[0], p[1], self.LIFT_Z])
                tgt = a.aux["lift_tgt"]
                if p[2] > self.LIFT_Z - 0.03:
                    if hpos[2] > a.aux["ham_z0"] + 0.08 and self._grasping(0, self.rs.transport.payload.handle_geoms):
                        a.go("ham_carry")
                    else:
                        self._retry(a, "ham_lift", "ham_reopen")
                elif a.t_phase > 60:
                    self._retry(a, "ham_lift", "ham_reopen")
                return self._cmd(0, tgt, R, CLOSE, vmax=0.8)
        if ph == "ham_reopen":
            if a.t_phase > 12:
                a.go("ham_hover")
            return self._cmd(0, p + np.array([0, 0, 0.04 if a.t_phase > 6 else 0.0]), Rc, OPEN)
        if ph in ("ham_carry", "ham_hold"):
            if not self._grasping(0, self.rs.transport.payload.handle_geoms) and not self.arms[1].aux.get("has_hammer"):
                self._log(0, "hammer lost while carrying")
                a.go("ham_reopen")
                return self._cmd(0, p, Rc, OPEN)
            tgt = self.HANDOVER.copy()
            if ph == "ham_carry":
                if self._at(0, tgt, _R_DOWN0, tol=0.012, rtol=0.06) or a.t_phase > 120:
                    a.go("ham_hold")
                    self._log(0, "at handover")
                return self._cmd(0, tgt, _R_DOWN0, CLOSE, vmax=0.8)
            # hold still until robot1 confirms its grasp
            if self.arms[1].aux.get("has_hammer"):
                a.go("ham_release")
            return self._cmd(0, tgt, _R_DOWN0, CLOSE, vmax=0.3)
        if ph == "ham_release":
            if a.t_phase > 10:
                a.go("retreat")
                self._log(0, "released")
            return self._cmd(0, p, Rc, OPEN, vmax=0.0)
        if ph == "retreat":
            tgt = np.array([0.0, -0.30, 1.15])
            if a.t_phase == 1:
                a.aux["retreat_from"] = p.copy()
            if a.t_phase < 8:  # straight up first, out of the handle's way
                return self._cmd(0, a.aux["retreat_from"] + np.array([0, 0, 0.06]), Rc, OPEN, vmax=0.4)
            return self._cmd(0, tgt, _R_DOWN0, OPEN, vmax=0.8)
        if ph == "give_up":
            return self._cmd(0, p, Rc, OPEN, vmax=0.0)
        raise RuntimeError(f"robot0: unknown phase {ph}")

    def _lid_R(self):
        return _R_DOWN0

    def _lid_on_start_bin(self) -> bool:
        return self.tenv.lid_on_start_bin()

    # ------------------------------------------------------------------ robot1
    def _robot1(self) -> np.ndarray:
        a = self.arms[1]
        a.t_phase += 1
        p, Rc = self._site(1)
        ph = a.phase
        tr = self.rs.transport
        if ph == "start":
            a.go("trash_hover")
            ph = a.phase
        if ph in ("trash_hover", "trash_descend", "trash_close", "trash_lift"):
            tp, tR = self._trash()
            yaw = np.arctan2(tR[1, 0], tR[0, 0])
            if ph in ("trash_hover", "trash_descend"):
                a.aux["g"] = (tp + np.array([0, 0, 0.004]), _yaw_aligned(_R_DOWN1, yaw, np.pi / 2))
            grasp, R = a.aux["g"]
            if ph == "trash_hover":
                tgt = np.array([grasp[0], grasp[1], max(grasp[2] + self.HOVER, 1.0)])
                if np.linalg.norm(p[:2] - tgt[:2]) > 0.05 and p[2] < 0.98:
                    return self._cmd(1, np.array([p[0], p[1], 1.03]), R, OPEN)
                if self._at(1, tgt, R, tol=0.015, rtol=0.08) or a.t_phase > 80:
                    a.go("trash_descend")
                return self._cmd(1, tgt, R, OPEN)
            if ph == "trash_descend":
                return self._descend(a, 1, grasp, R, "trash_close", "trash_align", "trash_hover", vmax=0.4)
            if ph == "trash_close":
                if self._settled(a, 1) or a.t_phase > 40:
                    if self._grasping(1, tr.trash):
                        a.aux["trash_z0"] = tp[2]
                        a.go("trash_lift")
                    else:
                        self._retry(a, "trash_grasp", "trash_reopen")
                return self._cmd(1, grasp, R, CLOSE)
            if ph == "trash_lift":
                if a.t_phase == 1:
                    a.aux["lift_tgt"] = np.array([p[0], p[1], 1.05])
                if p[2] > 1.02:
                    if tp[2] > a.aux["trash_z0"] + 0.08:
                        a.go("trash_move")
                    else:
                        self._retry(a, "trash_lift", "trash_reopen")
                elif a.t_phase > 60:
                    self._retry(a, "trash_lift", "trash_reopen")
                return self._cmd(1, a.aux["lift_tgt"], R, CLOSE, vmax=0.8)
        if ph == "trash_reopen":
            if a.t_phase > 12:
                a.go("trash_hover")
            return self._cmd(1, p + np.array([0, 0, 0.04 if a.t_phase > 6 else 0.0]), Rc, OPEN)
        if ph == "trash_move":
            bin_p = np.array(tr.trash_bin_pos)
            tgt = np.array([bin_p[0], bin_p[1], 1.05])
            if not self._grasping(1, tr.trash):
                self._log(1, "trash dropped while moving")
                a.go("trash_check")
                return self._cmd(1, p, Rc, OPEN)
            if self._at(1, tgt, Rc, tol=0.02, rtol=1.0) or a.t_phase > 80:
                a.go("trash_drop")
            return self._cmd(1, tgt, _R_DOWN1, CLOSE, vmax=1.0)
        if ph == "trash_drop":
            if a.t_phase > 6:
                a.go("trash_check")
            return self._cmd(1, p, Rc, OPEN, vmax=0.0)
        if ph == "trash_check":  # wait until the cube came to rest; re-pick it when it missed the bin
            tp, _ = self._trash()
            if tr.trash_in_trash_bin:
                a.go("pre_handover")
            elif a.t_phase > 25:
                self._retry(a, "trash_bin", "trash_hover")
            return self._cmd(1, np.array([p[0], p[1], 1.08]), Rc, OPEN)
        if ph in ("pre_handover", "ho_descend", "ho_close", "ho_wait_release"):
            gp, yaw, hpos = self._hammer_grasp_point(1)
            if ph in ("pre_handover", "ho_descend"):
                a.aux["g"] = (gp + np.array([0, 0, 0.002]), _yaw_aligned(_rotx(-self.HO_PITCH) @ _R_DOWN1, yaw, np.pi))
            grasp, R = a.aux["g"]
            r0 = self.arms[0].phase
            if ph == "pre_handover":
                hover = grasp + np.array([0, 0, 0.08])
                if r0 not in ("ham_hold",):
                    # wait beside the handover point, out of robot0's way
                    return self._cmd(1, np.array([0.0, 0.18, 1.18]), _R_DOWN1, OPEN)
                a.aux["ho_wait"] = a.aux.get("ho_wait", 0) + 1  # steps since robot0 holds still at the handover
                if (self._at(1, hover, R, tol=0.012, rtol=0.08) or a.aux["ho_wait"] > 80) and self.arms[0].t_phase > 5:
                    a.go("ho_descend")
                return self._cmd(1, hover, R, OPEN, vmax=0.8)
            if ph == "ho_descend":
                return self._descend(a, 1, grasp, R, "ho_close", "ho_align", "pre_handover", vmax=0.35)
            if ph == "ho_close":
                if self._settled(a, 1) or a.t_phase > 40:
                    if self._grasping(1, tr.payload.handle_geoms):
                        a.aux["has_hammer"] = True
                        self._log(1, "holds hammer")
                        a.go("ho_wait_release")
                    else:
                        self._retry(a, "ho_grasp", "ho_reopen")
                return self._cmd(1, grasp, R, CLOSE)
            if ph == "ho_wait_release":
                if r0 == "retreat" and self.arms[0].t_phase > 6:
                    a.go("carry_lift")
                return self._cmd(1, p, Rc, CLOSE, vmax=0.0)
        if ph == "ho_reopen":
            if a.t_phase > 10:
                a.go("pre_handover")
            return self._cmd(1, p + np.array([0, 0, 0.05 if a.t_phase > 5 else 0.0]), Rc, OPEN)
        if ph in ("carry_lift", "carry_move", "carry_lower"):
            if not self._grasping(1, tr.payload.handle_geoms):
                hpos, _ = self._hammer()
                if a.t_phase > 3 and hpos[2] < 0.95:
                    self._log(1, "hammer lost")
                    a.go("give_up")
                    return self._cmd(1, p, Rc, OPEN)
            hpos, _ = self._hammer()
            off = p - hpos  # grip site relative to the hammer centre (live)
            bin_p = np.array(tr.target_bin_pos)
            if ph == "carry_lift":
                tgt = np.array([p[0], p[1], self.LIFT_Z]) if a.t_phase == 1 else a.aux["lift_tgt"]
                a.aux["lift_tgt"] = tgt
                if p[2] > self.LIFT_Z - 0.02 or a.t_phase > 30:
                    a.go("carry_move")
                return self._cmd(1, tgt, Rc if a.t_phase == 1 else a.aux.setdefault("carry_R", Rc), CLOSE, vmax=0.8)
            R = a.aux.setdefault("carry_R", Rc)
            if ph == "carry_move":
                tgt = np.array([bin_p[0] + off[0], bin_p[1] + off[1], self.LIFT_Z])
                if self._at(1, tgt, R, tol=0.015, rtol=0.1) or a.t_phase > 120:
                    a.go("carry_lower")
                return self._cmd(1, tgt, R, CLOSE, vmax=0.8)
            if ph == "carry_lower":
                # hammer centre down to ~4 cm above the bin floor
                floor = bin_p[2]
                tgt = np.array([bin_p[0] + off[0], bin_p[1] + off[1], floor + 0.05 + off[2]])
                if hpos[2] < floor + 0.06 or a.t_phase > 60:
                    a.go("place_release")
                return self._cmd(1, tgt, R, CLOSE, vmax=0.4)
        if ph == "place_release":
            if a.t_phase > 10:
                a.go("done")
            return self._cmd(1, p, Rc, OPEN, vmax=0.0)
        if ph == "done":
            tgt = (
                np.array([p[0], p[1], 1.1])
                if a.t_phase == 1
                else a.aux.setdefault("done_tgt", np.array([p[0], p[1], 1.1]))
            )
            return self._cmd(1, tgt, Rc, OPEN, vmax=0.3)
        if ph == "give_up":
            return self._cmd(1, p, Rc, OPEN, vmax=0.0)
        raise RuntimeError(f"robot1: unknown phase {ph}")

    # ------------------------------------------------------------------ public
    def act_delta(self, env=None) -> np.ndarray:
        """The 14-dim normalised world-frame delta action (noise included)."""
        if env is not None:
            self._bind(env)
        a0 = self._robot0()
        a1 = self._robot1()
        act = np.concatenate([a0, a1])
        self.last_clean = np.clip(act, -1.0, 1.0)  # the expert's own command at this state (DART-style labels)
        if self.action_noise > 0:
            act = act + self.action_noise * self.rng.standard_normal(act.shape)
        self.t += 1
        return np.clip(act, -1.0, 1.0)

    def act(self, env) -> np.ndarray:
        """Action for ``env``'s action space: 14-dim delta, or 20-dim absolute (pos, rot6d, gripper) x 2."""
        self._bind(env)
        act = self.act_delta()
        if not self.tenv.abs_action:
            return act.astype(np.float32)
        return delta_to_abs_action(self, act).astype(np.float32)

    @property
    def phases(self) -> tuple[str, str]:
        return self.arms[0].phase, self.arms[1].phase


def delta_to_abs_action(expert: TransportExpert, act: np.ndarray) -> np.ndarray:
    """The absolute goal (pos, rot6d, gripper) x 2 that the world-frame delta controller would set for ``act``."""
    out = []
    for i in range(2):
        a = act[7 * i : 7 * i + 7]
        p, Rc = expert._site(i)
        pos = p + a[:3] * POS_SCALE
        R = axis_angle_to_matrix(a[3:6] * ROT_SCALE) @ Rc
        out.append(np.concatenate([pos, matrix_to_rot6d(R), a[6:7]]))
    return np.concatenate(out)


# ============================================================================ episodes and demos
def controller_goal_abs(tenv) -> np.ndarray:
    """Current OSC goals of both arms as an absolute action (pos, axis-angle, gripper) x 2 = 14 (as DP records)."""
    out = []
    for r in tenv.env.robots:
        c = r.part_controllers["right"]
        out.append(np.concatenate([np.asarray(c.goal_pos, float), matrix_to_axis_angle(np.asarray(c.goal_ori))]))
    return np.stack(out)


def clean_goal_abs(goal: np.ndarray, sent: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The controller goal (pos, axis-angle, gripper) x 2 that ``clean`` would have set, from the goal ``goal``
    (2 x 6, ``controller_goal_abs``) that the sent delta ``sent`` did set: the same reference pose, so clean and
    executed labels agree exactly when no noise was added."""
    out = []
    for i in range(2):
        s, c = sent[7 * i : 7 * i + 7], clean[7 * i : 7 * i + 7]
        pos = goal[i, :3] + (c[:3] - s[:3]) * POS_SCALE
        R_ref = axis_angle_to_matrix(s[3:6] * ROT_SCALE).T @ axis_angle_to_matrix(goal[i, 3:6])
        R = axis_angle_to_matrix(c[3:6] * ROT_SCALE) @ R_ref
        out.append(np.concatenate([pos, matrix_to_axis_angle(R), c[6:7]]))
    return np.concatenate(out)


def run_expert_episode(
    seed: int,
    action_noise: float = 0.0,
    max_steps: int = 700,
    env=None,
    record: bool = False,
    image_keys: tuple[str, ...] = (),
    stop_after_success: int | None = None,
    expert_seed: int | None = None,
    lite_physics: bool | None = None,
    label: str = "executed",
) -> dict:
    """One seeded episode of the expert. With ``record`` the result holds robomimic-style arrays.

    ``label="executed"`` records the action sent to the env (noise included) and, as the absolute action, the
    controller goal it produced. ``label="clean"`` records, at every (noise-perturbed) state, the expert's own
    noise-free command instead (DART, Laskey et al. 2017): the states spread wider than a clean run while every
    label points back at the expert's path, so the data holds corrections the clean demonstrations never show."""
    if label not in ("executed", "clean"):
        raise ValueError(f"run_expert_episode: label={label!r}, expected 'executed' or 'clean'")
    own = env is None
    if own:
        keys = tuple(LOWDIM_SHAPES) + tuple(image_keys)
        env = TransportEnv(obs_keys=keys, enable_render=False, lite_physics=lite_physics)
    if label == "clean" and env.abs_action:
        raise ValueError(
            "run_expert_episode: label='clean' needs a delta-action env (the labels are derived from "
            "the delta command and the controller goal it set)"
        )
    expert = TransportExpert(seed if expert_seed is None else expert_seed, action_noise=action_noise)
    t0 = time.time()
    env.reset(seed=seed)
    expert.reset(env)
    rec: dict[str, list] = {"obs": [], "actions": [], "actions_abs": [], "states": [], "rewards": []}
    success_step = None
    steps = 0
    for t in range(max_steps):
        if record:
            rec["obs"].append(env.raw_obs())
            rec["states"].append(env.get_state())
        act = expert.act(env)
        _, reward, _, _, info = env.step(act)
        steps += 1
        if record:
            g = controller_goal_abs(env)
            if label == "clean":
                sent, clean = np.asarray(act, np.float64), np.asarray(expert.last_clean, np.float64)
                rec["actions"].append(clean)
                rec["actions_abs"].append(clean_goal_abs(g, sent, clean))
            else:
                rec["actions"].append(np.asarray(act, np.float64))
                grips = (
                    np.asarray(act, np.float64).reshape(2, 7)[:, 6:7]
                    if not env.abs_action
                    else np.asarray(act).reshape(2, 10)[:, 9:10]
                )
                rec["actions_abs"].append(np.concatenate([g, grips], axis=1).reshape(-1))
            rec["rewards"].append(float(reward))
        if info["success"] and success_step is None:
            success_step = t + 1
        if success_step is not None and stop_after_success is not None and steps >= success_step + stop_after_success:
            break
    out = {
        "seed": seed,
        "success": success_step is not None,
        "success_step": success_step,
        "steps": steps,
        "wall_s": time.time() - t0,
        "events": expert.events,
        "final_phases": expert.phases,
    }
    if record:
        rec["obs"].append(env.raw_obs())
        out["record"] = rec
    if own:
        env.close()
    return out


def _episode_worker(args):
    seed, noise, max_steps, record, image_keys, stop_after = args[:6]
    lite = args[6] if len(args) > 6 else None
    label = args[7] if len(args) > 7 else "executed"
    try:
        return run_expert_episode(
            seed,
            noise,
            max_steps,
            record=record,
            image_keys=image_keys,
            stop_after_success=stop_after,
            lite_physics=lite,
            label=label,
        )
    except Exception as e:  # report, don't kill the pool
        return {"seed": seed, "success": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}


_WORKER_ENV = None


def _pool_init():
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        os.nice(0)
    except OSError:
        pass


def evaluate_expert(
    seeds,
    action_noise: float = 0.0,
    n_workers: int = 2,
    max_steps: int = 700,
    progress: bool = True,
    lite_physics: bool | None = None,
) -> dict:
    """Success rate of the expert on ``seeds`` (parallel processes)."""
    args = [
        (int(s), action_noise, max_steps, False, (), 0, lite_physics) for s in seeds
    ]  # stop at success (= max reward)
    results = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_workers, initializer=_pool_init, maxtasksperchild=10) as pool:
        for r in tqdm(
            pool.imap_unordered(_episode_worker, args),
            total=len(args),
            disable=not progress,
            desc=f"expert sigma={action_noise}",
        ):
            results.append(r)
            if progress:
                tqdm.write(
                    f"seed {r['seed']}: success={r['success']} step={r.get('success_step')} "
                    f"phases={r.get('final_phases')} wall={r.get('wall_s', 0):.0f}s {r.get('error', '')}"
                )
    results.sort(key=lambda r: r["seed"])
    succ = [r["success"] for r in results]
    steps = [r["success_step"] for r in results if r.get("success_step")]
    return {
        "n": len(results),
        "success_rate": float(np.mean(succ)) if succ else 0.0,
        "n_success": int(np.sum(succ)),
        "mean_success_step": float(np.mean(steps)) if steps else None,
        "failures": [{k: r.get(k) for k in ("seed", "final_phases", "error")} for r in results if not r["success"]],
        "results": results,
    }


# ============================================================================ demos command
def _recorded_to_demo(rec: dict, image_keys) -> dict:
    obs = {}
    for k in list(LOWDIM_SHAPES) + list(image_keys):
        rk = "object-state" if k == "object" else k
        arr = np.stack([o[rk] for o in rec["obs"]])
        obs[k] = arr.astype(np.uint8) if k.endswith("_image") else arr.astype(np.float64)
    return {
        "obs": obs,
        "actions": np.stack(rec["actions"]),
        "actions_abs": np.stack(rec["actions_abs"]),
        "states": np.stack(rec["states"]),
        "rewards": np.asarray(rec["rewards"]),
    }


def generate_transport_demos(cfg, run_dir) -> dict:
    """``shortcut-policy demos task=transport n_episodes=N out=DIR [workers=2] [seed=0] [overwrite=true]
    [+expert.action_noise=0.1] [+expert.label=clean]`` (keys of configs/demos.yaml; ``+`` adds the Transport-only
    one). ``task=transport`` (alias of transport_lowdim) records low-dim obs, ``task=transport_image`` also the 4
    cameras.

    Writes robomimic hdf5 files in the official layout - ``DIR/low_dim.hdf5`` (delta actions) and
    ``DIR/low_dim_abs.hdf5`` (absolute actions, ``control_delta=False``) or ``image*.hdf5`` - plus the zarr
    ReplayBuffers the training configs read (``DIR/low_dim.zarr``, ``DIR/low_dim_abs.zarr``; for images also the
    camera keys). Only successful episodes are kept (each recorded until 10 steps after success); seeds start at
    ``seed`` (default 0, disjoint from the test seeds 100000+); episodes run up to ``+expert.max_steps`` steps
    (default 700; demos.yaml's ``max_steps`` is Push-T's). ``+expert.keep_failed=true`` also keeps episodes that
    did not succeed (truncated smoke-test data, e.g. a few dozen camera steps; never for training a real policy:
    RESULT's ``n_unsuccessful_kept`` counts them). RESULT keys: n_episodes, n_dropped, n_unsuccessful_kept,
    seconds, out, the four file paths.
    """

    def get(key, default=None):
        cur = cfg
        for part in key.split("."):
            if cur is None or not hasattr(cur, "get"):
                return default
            cur = cur.get(part, None)
        return default if cur is None else cur

    n_eps = int(get("n_episodes", 10))
    out_s = str(get("out", None) or Path(str(get("task.dataset.zarr_path", "data/transport_expert/x"))).parent)
    if out_s.endswith("pusht_expert.zarr"):  # the demos.yaml default belongs to Push-T
        out_s = str(Path(str(get("task.dataset.zarr_path", "data/transport_expert/x"))).parent)
    out = Path(out_s)
    overwrite = bool(get("overwrite", False))
    noise = float(get("expert.action_noise", get("action_noise", 0.0)))
    label = str(get("expert.label", "executed"))
    if label not in ("executed", "clean"):
        raise ValueError(f"demos task=transport: expert.label={label!r}, expected 'executed' or 'clean'")
    ep_steps = int(get("expert.max_steps", 700))
    keep_failed = bool(get("expert.keep_failed", False))
    if ep_steps < 1:
        raise ValueError(f"demos task=transport: expert.max_steps={ep_steps}, expected a positive step count")
    n_workers = int(get("workers", None) or get("n_workers", None) or 2)
    seed_start = int(get("seed", get("seed_start", 0)))
    # robosuite's lite_physics only drops redundant mj_forward calls: measured bit-identical observations and
    # ~1.5x faster (docs/results/transport.md), so demonstrations are recorded with it unless told otherwise.
    lite = bool(get("lite_physics", get("task.lite_physics", True)))
    obs_type = str(get("obs_type", None) or get("task.obs_type", "lowdim"))
    if obs_type not in ("lowdim", "image"):
        raise ValueError(f"demos task=transport: obs_type={obs_type!r}, expected lowdim or image")
    image_keys = tuple(IMAGE_KEYS) if obs_type == "image" else ()
    stem = "image" if image_keys else "low_dim"
    files = {
        "hdf5": out / f"{stem}.hdf5",
        "hdf5_abs": out / f"{stem}_abs.hdf5",
        "zarr": out / f"{stem}.zarr",
        "zarr_abs": out / f"{stem}_abs.zarr",
    }
    for p in files.values():
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; pass overwrite=true to replace it")
    out.mkdir(parents=True, exist_ok=True)
    max_tries = int(get("max_attempts", None) or 2 * n_eps + 10)
    w = RobomimicHdf5Writer(files["hdf5"], default_env_meta(False), overwrite=overwrite)
    w_abs = RobomimicHdf5Writer(files["hdf5_abs"], default_env_meta(True), overwrite=overwrite)
    if image_keys:
        for meta_w in (w, w_abs):
            meta_w._env_meta["env_kwargs"].update(
                {"use_camera_obs": True, "has_offscreen_renderer": True, "camera_names": [k[:-6] for k in image_keys]}
            )
    n_ok, n_fail, tried, errors, n_kept_failed = 0, 0, 0, [], 0
    t0 = time.time()
    seeds = iter(range(seed_start, seed_start + max_tries))
    ctx = mp.get_context("spawn")
    try:
        with (
            ctx.Pool(n_workers, initializer=_pool_init, maxtasksperchild=5) as pool,
            tqdm(total=n_eps, desc="transport demos") as bar,
        ):
            pending = []

            def submit():
                nonlocal tried
                s = next(seeds, None)
                if s is None:
                    return False
                tried += 1
                pending.append(
                    pool.apply_async(_episode_worker, ((s, noise, ep_steps, True, image_keys, 10, lite, label),))
                )
                return True

            for _ in range(min(n_workers * 2, n_eps)):
                submit()
            while pending and n_ok < n_eps:
                res = pending.pop(0).get()
                if res.get("success") or (keep_failed and "record" in res):
                    n_kept_failed += 0 if res.get("success") else 1
                    d = _recorded_to_demo(res["record"], image_keys)
                    for writer, key in ((w, "actions"), (w_abs, "actions_abs")):
                        writer.add_demo(obs=d["obs"], actions=d[key], states=d["states"], rewards=d["rewards"])
                    n_ok += 1
                    bar.update(1)
                else:
                    n_fail += 1
                    bar.set_postfix(failed=n_fail)
                    if res.get("error"):
                        errors.append(f"seed {res['seed']}: {res['error']}")
                        tqdm.write(f"transport demos: seed {res['seed']} raised {res['error']}")
                if n_ok + len(pending) < n_eps:
                    submit()
            pool.terminate()
        if n_ok < n_eps:
            raise RuntimeError(
                f"transport demos: only {n_ok}/{n_eps} successful episodes in {tried} seeds"
                + (f"; first error: {errors[0]}" if errors else "")
            )
        w.close(val_ratio=0.02 if n_ok > 10 else None)
        w_abs.close(val_ratio=0.02 if n_ok > 10 else None)
    except BaseException:
        w.abort()
        w_abs.abort()
        raise
    lowdim = list(LOWDIM_SHAPES)
    keys = lowdim + list(image_keys)
    concat = {} if image_keys else {"obs": list(LOWDIM_CONCAT_KEYS)}
    robomimic_to_replay_buffer(
        files["hdf5"], keys, concat, abs_action=False, out_path=files["zarr"], overwrite=overwrite
    )
    robomimic_to_replay_buffer(
        files["hdf5_abs"], keys, concat, abs_action=True, out_path=files["zarr_abs"], overwrite=overwrite
    )
    res = {
        "task": "transport",
        "n_episodes": n_ok,
        "n_dropped": n_fail,
        "seeds_tried": tried,
        "expert_success_rate": (n_ok - n_kept_failed) / max(n_ok + n_fail, 1),
        "action_noise": noise,
        "label": label,
        "max_steps": ep_steps,
        "n_unsuccessful_kept": n_kept_failed,
        "seconds": time.time() - t0,
        "out": str(out),
        **{k: str(v) for k, v in files.items()},
    }
    atomic_write_text(Path(run_dir) / "demos.json", json.dumps(res, indent=2))
    return res


demos = generate_transport_demos  # the name in the env registry (envs/registry.py)


def _parse_seeds(spec: str) -> list[int]:
    out = []
    for part in str(spec).split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def main(argv=None) -> int:
    """``python -m shortcut_policy.envs.experts.transport --seeds 100000-100049 --noise 0.1 --workers 2``"""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument(
        "--seeds",
        default=f"{TEST_SEED_START}-{TEST_SEED_START + 49}",
        help="a-b (inclusive) or a,b,c; default: the 50 test seeds",
    )
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the full result JSON here")
    ap.add_argument(
        "--lite-physics",
        action="store_true",
        help="robosuite lite_physics=True (bit-identical results here, about 1.5x faster)",
    )
    args = ap.parse_args(argv)
    res = evaluate_expert(
        _parse_seeds(args.seeds), args.noise, args.workers, lite_physics=True if args.lite_physics else None
    )
    summary = {k: v for k, v in res.items() if k != "results"}
    summary["mean_wall_s"] = float(np.mean([r.get("wall_s", np.nan) for r in res["results"]]))
    if args.out:
        atomic_write_text(args.out, json.dumps({**summary, "results": res["results"]}, indent=1, default=str))
    print("RESULT " + json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
