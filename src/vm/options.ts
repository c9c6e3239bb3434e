/**
 * Option checks shared by savevm and loadvm: mistakes throw TypeError
 * naming the option, synchronously, before anything talks to QEMU.
 */
import { describe, validateFunction, validateSignal } from '../validate.js';

interface CommonVmOptions {
  signal?: AbortSignal;
  onProgress?: (progress: never) => void;
  vmstateDisk?: string;
}

export function validateCommonVmOptions<T extends CommonVmOptions>(options: T | undefined): T {
  if (options === undefined) return {} as T;
  if (options === null || typeof options !== 'object') throw new TypeError(`Expected an object for options, received ${describe(options)}`);
  validateSignal(options.signal, 'options.signal');
  validateFunction(options.onProgress, 'options.onProgress');
  if (options.vmstateDisk !== undefined && (typeof options.vmstateDisk !== 'string' || options.vmstateDisk === '')) {
    throw new TypeError(`Expected a disk name for options.vmstateDisk, received ${describe(options.vmstateDisk)}`);
  }
  return options;
}
