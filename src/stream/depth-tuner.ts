/**
 * How many writes the disk sees at once, chosen by measurement on the device
 * at hand (DESIGN.md, "Mechanisms"). Devices disagree: on the disk these
 * figures first came from, one 4 MiB O_DIRECT write at a time beat two by
 * 12%; on a virtio disk under load fio did 267 MB/s with one in flight and
 * 372 MB/s with four, and on a loop device 286 against 1108 (docs/performance.md).
 *
 * The stream's target has `threads` native threads (the most writes that can
 * run at once). The tuner runs the stream's own writes at depth 1, then at
 * full depth, each for PROBE_BYTES, and keeps the depth whose device rate was
 * better; it probes again every STEADY_BYTES, so a disk whose behaviour
 * changes under other load is followed. No extra I/O is issued.
 *
 * The device rate of a phase is bytes completed over the time at least one
 * write was outstanding, so a producer slower than the disk (the JS thread
 * filling buffers) does not count against either depth: then both depths
 * measure alike and the tie goes to depth 1, the plainest sequential pattern.
 */
import { performance } from 'node:perf_hooks';
import { assert } from '../assert.js';
import type { TargetFile } from '../io/target-file.js';

/** Per phase: 32 MiB is 8 default buffers, long enough to span several writes. */
const PROBE_BYTES = 32 * 1024 * 1024;
const MIN_PROBE_WRITES = 4;
/** Bytes before the first probe: the first writes also pay for block allocation. */
const WARMUP_BYTES = 8 * 1024 * 1024;
/** Bytes between probes once a depth is chosen. */
const STEADY_BYTES = 1024 * 1024 * 1024;
/** Full depth is kept only when it is at least this much faster than depth 1. */
const PREFER_DEEPER_RATIO = 1.05;

const Phase = { Warmup: 0, ProbeShallow: 1, ProbeDeep: 2, Steady: 3 } as const;
type Phase = (typeof Phase)[keyof typeof Phase];

export class DepthTuner {
  private readonly _file: TargetFile;
  private readonly _maxDepth: number;
  private _phase: Phase = Phase.Warmup;
  private _depth: number;
  private _phaseBytes = 0;
  private _phaseWrites = 0;
  private _phaseBusyMs = 0;
  private _busySince = -1; // performance.now() when writes became outstanding, -1 when none are
  private _shallowRate = 0;
  /** Depths chosen so far, for tests and diagnostics. */
  readonly decisions: { depth: number; shallowMiBps: number; deepMiBps: number }[] = [];

  constructor(file: TargetFile) {
    this._file = file;
    this._maxDepth = file.threads;
    this._depth = file.threads;
    assert(this._maxDepth >= 1, 'a target with at least one I/O thread');
  }

  /** The depth writes run at now. */
  get depth(): number {
    return this._depth;
  }

  /** A write was submitted; `inFlight` counts it. */
  submitted(inFlight: number): void {
    if (inFlight === 1) this._busySince = performance.now();
  }

  /** A write of `bytes` completed; `inFlight` no longer counts it. */
  completed(bytes: number, inFlight: number): void {
    const now = performance.now();
    if (this._busySince >= 0) {
      this._phaseBusyMs += now - this._busySince;
      this._busySince = inFlight > 0 ? now : -1;
    }
    this._phaseBytes += bytes;
    this._phaseWrites++;
    if (this._maxDepth > 1 && this._phaseBytes >= this._phaseLength()) this._advance();
  }

  private _phaseLength(): number {
    if (this._phase === Phase.Warmup) return WARMUP_BYTES;
    if (this._phase === Phase.Steady) return STEADY_BYTES;
    return this._phaseWrites >= MIN_PROBE_WRITES ? PROBE_BYTES : Number.POSITIVE_INFINITY;
  }

  private _advance(): void {
    const rate = this._phaseBusyMs > 0 ? this._phaseBytes / this._phaseBusyMs : 0;
    switch (this._phase) {
      case Phase.Warmup:
      case Phase.Steady:
        this._enter(Phase.ProbeShallow, 1);
        break;
      case Phase.ProbeShallow:
        this._shallowRate = rate;
        this._enter(Phase.ProbeDeep, this._maxDepth);
        break;
      case Phase.ProbeDeep: {
        const deeper = rate > this._shallowRate * PREFER_DEEPER_RATIO;
        const toMiBps = (bytesPerMs: number): number => Math.round((bytesPerMs * 1000) / 2 ** 20);
        this.decisions.push({ depth: deeper ? this._maxDepth : 1, shallowMiBps: toMiBps(this._shallowRate), deepMiBps: toMiBps(rate) });
        this._enter(Phase.Steady, deeper ? this._maxDepth : 1);
        break;
      }
    }
  }

  private _enter(phase: Phase, depth: number): void {
    this._phase = phase;
    this._phaseBytes = 0;
    this._phaseWrites = 0;
    this._phaseBusyMs = 0;
    if (this._busySince >= 0) this._busySince = performance.now();
    if (depth !== this._depth && !this._file.closed) {
      this._depth = depth;
      this._file.setConcurrency(depth);
    }
  }
}
