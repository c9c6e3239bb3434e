/**
 * The registry of throughput cases, in table order.
 *
 * A case is a module whose default export is:
 *
 *   {
 *     id: 'f',                    // short, unique; used by --only and in results
 *     label: '...',               // one line for the table
 *     kind?: 'device-write' | 'device-read' | 'read', // default: a writer. Device cells form the
 *                                 // references; 'read' cases are compared with the read reference
 *     sizeClass: 'fast' | 'slow', // 'slow' writers get --slow-size bytes (rates are rates)
 *     verifiable?: false,         // its file is not the page stream (skip --verify)
 *     available?(): string|undefined, // a reason to skip (e.g. a module not built yet)
 *     prepare?(ctx) -> state,     // untimed: allocate buffers
 *     run(ctx, state) -> { bytes, seconds?, extra? },  // timed, including the final fsync/fdatasync;
 *                                 // `seconds` overrides the runner's clock (fio reports its own)
 *   }
 *
 * ctx = { workload, path, rep, tmpDir, helpers }. `path` is a fresh file in
 * the scratch directory, deleted after the run; `extra` is any JSON (e.g.
 * { extents } from helpers.extentCount(path)) and lands in the results.
 *
 * A case whose file is a container of the stream (a qcow2 image) sets
 * `container: true`: its file size is then not compared with the stream's.
 */
import a from './a-write-sync.js';
import b from './b-qemu-iov64.js';
import c from './c-qemu-iovmax.js';
import d from './d-write-stream.js';
import e from './e-ring-no-overlap.js';
import f, { freshRing as fc } from './f-snapshot-stream.js';
import f2, { oldDefaults as f0 } from './f2-snapshot-stream-deep.js';
import { fioCases } from './fio-device.js';
import { deviceReadCases, deviceWriteCases } from './g-device.js';
import q, { qcow2Preallocated as qp } from './q-qcow2-save.js';
import r, { rawPreallocated as rp } from './r-raw-prealloc.js';
import { fileToQcow2 as sf, socketAlone as sn, socketNetToQcow2 as sj, socketToQcow2 as s } from './s-socket-source.js';
import x, { exportBefore as x0, exportPumped as xp } from './x-vmstate-export.js';

export const CASES = [a, b, c, d, e, f0, f, fc, f2, r, rp, q, qp, s, sj, sf, sn, x0, x, xp, ...deviceWriteCases, ...deviceReadCases, ...fioCases];
