/**
 * The slice of the public API (src/index.ts) the command line uses, and
 * nothing deeper. The qcow2 functions are looked up on the module so this
 * file builds before they are exported; a build without them answers with a
 * coded error instead of failing to load.
 */
import type { Readable, Writable } from 'node:stream';
import * as api from '../index.js';

export { createSnapshotStream, SnapshotError, isSnapshotError } from '../index.js';
export type { StreamOptions, ProgressEvent, SnapshotStream } from '../index.js';

/** One entry of `img.snapshots()` (DESIGN.md, "Public API"). */
export interface SnapshotInfo {
  id: string | number;
  name: string;
  vmStateSize: number | bigint;
  date: Date | number | { sec: number; nsec: number } | unknown;
  vmClockNs: number | bigint;
  diskSize?: number | bigint;
  icount?: number | bigint;
}

export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors?: number;
  [key: string]: unknown;
}

export interface Image {
  snapshots(): SnapshotInfo[];
  createSnapshotStream(name: string, options?: api.StreamOptions): Writable;
  createVmStateReadStream(idOrName: string): Readable;
  deleteSnapshot(idOrName: string): Promise<void>;
  check(): Promise<CheckResult>;
  close(): Promise<void>;
}

export interface OpenOptions {
  readOnly?: boolean;
  forceShare?: boolean;
}

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface CreateImageOptions {
  size: number;
  clusterSize?: number;
  version?: 2 | 3;
  preallocation?: Preallocation;
}

type Api = {
  openImage?: (path: string, options?: OpenOptions) => Promise<Image>;
  createImage?: (path: string, options: CreateImageOptions) => Promise<unknown>;
};

const qcow2 = api as unknown as Api;

function unavailable(what: string): never {
  throw new api.SnapshotError('QCOW2_UNSUPPORTED', `${what} is not available in this build of snapstream`);
}

export function hasQcow2(): boolean {
  return typeof qcow2.openImage === 'function' && typeof qcow2.createImage === 'function';
}

export function openImage(path: string, options?: OpenOptions): Promise<Image> {
  return qcow2.openImage === undefined ? unavailable('openImage') : qcow2.openImage(path, options);
}

export function createImage(path: string, options: CreateImageOptions): Promise<unknown> {
  return qcow2.createImage === undefined ? unavailable('createImage') : qcow2.createImage(path, options);
}
