/**
 * The options of createImage(), validated once with the shared validators
 * and resolved into what the writer needs (create.ts).
 */
import {
  describe,
  validateBoolean,
  validateChoice,
  validateFunction,
  validateInteger,
  validateOptionsObject,
  validatePowerOfTwo,
  validateSignal,
} from '../validate.js';
import { MAX_BACKING_FILE_NAME_BYTES, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS } from './header.js';
import { Layout } from './layout.js';
import type { Preallocation } from './preallocate-image.js';

export interface CreateProgress {
  bytesDone: number;
  bytesTotal: number;
}

export interface CreateImageOptions {
  /** Virtual disk size in bytes; rounded up to 512 like qemu-img. */
  size: number;
  /** Power of two, 512 B .. 2 MiB. Default 64 KiB. */
  clusterSize?: number;
  /** 2 (compat=0.10) or 3 (compat=1.1). Default 3. */
  version?: 2 | 3;
  /** What to allocate up front, as qemu-img's `-o preallocation=`. Default 'off'. */
  preallocation?: Preallocation;
  /** Refcount entry width: 1, 2, 4, 8, 16, 32 or 64. Default 16; v2 requires 16. */
  refcountBits?: number;
  /** v3 only: set the lazy refcounts compatible bit. Default false. */
  lazyRefcounts?: boolean;
  /** Replace an existing file instead of failing with EEXIST. Default false. */
  overwrite?: boolean;
  /** Backing file name, stored as given (relative names resolve against the image's directory). */
  backingFile?: string;
  /** Format of the backing file ('qcow2', 'raw', ...); required with backingFile, as qemu-img 7.2 requires -F. */
  backingFormat?: string;
  /** Cancels the create; the file is removed. Checked between writes and fallocate chunks. */
  signal?: AbortSignal;
  /** Called after each metadata write, fallocate chunk or zero write. */
  onProgress?: (progress: CreateProgress) => void;
  /** Bytes per fallocate call ('falloc') or per progress step ('full'). Default 1 GiB / 8 MiB. */
  chunkBytes?: number;
  /**
   * Permission bits of the new file, before the umask. Default 0o644, as
   * qemu-img creates images: a new image holds no VM memory. A vmstate saved
   * into it later does not change the mode; vmstate files snapstream creates
   * itself (raw targets) are 0o600.
   */
  mode?: number;
}

const CREATE_OPTION_KEYS = [
  'size',
  'clusterSize',
  'version',
  'preallocation',
  'refcountBits',
  'lazyRefcounts',
  'overwrite',
  'backingFile',
  'backingFormat',
  'signal',
  'onProgress',
  'chunkBytes',
  'mode',
] as const;

export interface ResolvedCreateOptions {
  sizeBytes: number;
  layout: Layout;
  version: 2 | 3;
  preallocation: Preallocation;
  lazyRefcounts: boolean;
  overwrite: boolean;
  backingFile: Buffer | undefined;
  backingFormat: Buffer | undefined;
  signal: AbortSignal | undefined;
  onProgress: ((progress: CreateProgress) => void) | undefined;
  chunkBytes: number | undefined;
  mode: number;
}

/** qemu-img's mode for a new image (0644, then the umask): an image without vmstate needs no more secrecy than the disk. */
const DEFAULT_IMAGE_MODE = 0o644;
const SECTOR_BYTES = 512;
const REFCOUNT_WIDTHS = [1, 2, 4, 8, 16, 32, 64];
const PREALLOCATIONS: readonly Preallocation[] = ['off', 'metadata', 'falloc', 'full'];
/** chunkBytes granularity: one 4 KiB page, the zero writes' alignment. */
const CHUNK_GRANULE_BYTES = 4096;

function validateBacking(o: Partial<CreateImageOptions>, preallocation: Preallocation): Pick<ResolvedCreateOptions, 'backingFile' | 'backingFormat'> {
  const { backingFile, backingFormat } = o;
  if (backingFile === undefined) {
    if (backingFormat !== undefined) throw new TypeError(`Expected options.backingFile with options.backingFormat, received undefined`);
    return { backingFile: undefined, backingFormat: undefined };
  }
  if (typeof backingFile !== 'string' || backingFile.length === 0 || backingFile.includes('\0')) {
    throw new TypeError(`Expected a non-empty file name for options.backingFile, received ${describe(backingFile)}`);
  }
  const bytes = Buffer.byteLength(backingFile);
  if (bytes > MAX_BACKING_FILE_NAME_BYTES) {
    throw new RangeError(`Expected at most ${MAX_BACKING_FILE_NAME_BYTES} bytes for options.backingFile, received ${bytes} bytes`);
  }
  if (typeof backingFormat !== 'string' || !/^[a-z0-9_-]{1,16}$/i.test(backingFormat)) {
    // qemu-img 7.2: "Backing file specified without backing format".
    throw new TypeError(`Expected a format name such as 'qcow2' or 'raw' for options.backingFormat, received ${describe(backingFormat)}`);
  }
  if (preallocation !== 'off') {
    // QEMU 7.2 qcow2_co_create; extended L2 entries (the exception) are not supported here.
    throw new TypeError(
      `Expected preallocation 'off' with options.backingFile, received '${preallocation}': ` +
        'Backing file and preallocation can only be used at the same time if extended_l2 is on',
    );
  }
  return { backingFile: Buffer.from(backingFile, 'utf8'), backingFormat: Buffer.from(backingFormat, 'ascii') };
}

export function validateCreateOptions(options: unknown): ResolvedCreateOptions {
  if (options === undefined) throw new TypeError('Expected an object with a size for options, received undefined');
  const o = validateOptionsObject<CreateImageOptions>(options, 'options', CREATE_OPTION_KEYS);
  const size = validateInteger(o.size, 'options.size', 0);
  const clusterSize = validatePowerOfTwo(o.clusterSize ?? 65536, 'options.clusterSize', 2 ** MIN_CLUSTER_BITS, 2 ** MAX_CLUSTER_BITS);
  const version = validateChoice(o.version ?? 3, 'options.version', [2, 3] as const);
  const preallocation = validateChoice(o.preallocation ?? 'off', 'options.preallocation', PREALLOCATIONS);
  const refcountBits = validateChoice(o.refcountBits ?? 16, 'options.refcountBits', REFCOUNT_WIDTHS);
  if (version === 2 && refcountBits !== 16) throw new RangeError(`Expected 16 for options.refcountBits with version 2, received ${refcountBits}`);
  const lazyRefcounts = o.lazyRefcounts === undefined ? false : validateBoolean(o.lazyRefcounts, 'options.lazyRefcounts');
  if (lazyRefcounts && version === 2) throw new RangeError('Expected version 3 for options.lazyRefcounts, received version 2');
  const chunkBytes = o.chunkBytes === undefined ? undefined : validateInteger(o.chunkBytes, 'options.chunkBytes', CHUNK_GRANULE_BYTES);
  if (chunkBytes !== undefined && chunkBytes % CHUNK_GRANULE_BYTES !== 0) {
    throw new RangeError(`Expected a multiple of ${CHUNK_GRANULE_BYTES} for options.chunkBytes, received ${chunkBytes}`);
  }
  return {
    sizeBytes: Math.ceil(size / SECTOR_BYTES) * SECTOR_BYTES,
    layout: new Layout(Math.log2(clusterSize), Math.log2(refcountBits)),
    version,
    preallocation,
    lazyRefcounts,
    overwrite: o.overwrite === undefined ? false : validateBoolean(o.overwrite, 'options.overwrite'),
    ...validateBacking(o, preallocation),
    signal: validateSignal(o.signal, 'options.signal'),
    onProgress: validateFunction<(progress: CreateProgress) => void>(o.onProgress, 'options.onProgress'),
    chunkBytes,
    mode: validateInteger(o.mode ?? DEFAULT_IMAGE_MODE, 'options.mode', 0, 0o7777),
  };
}
