/**
 * Option checks shared by savevm and loadvm: mistakes throw TypeError
 * naming the option, synchronously, before anything talks to QEMU.
 */

interface CommonVmOptions {
  signal?: AbortSignal;
  onProgress?: (progress: never) => void;
  vmstateDisk?: string;
}

export function validateCommonVmOptions<T extends CommonVmOptions>(options: T | undefined): T {
  if (options === undefined) return {} as T;
  if (options === null || typeof options !== 'object') throw new TypeError(`Expected an object for options, received ${String(options)}`);
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) {
    throw new TypeError(`Expected an AbortSignal for options.signal, received ${String(options.signal)}`);
  }
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') {
    throw new TypeError(`Expected a function for options.onProgress, received ${String(options.onProgress)}`);
  }
  if (options.vmstateDisk !== undefined && (typeof options.vmstateDisk !== 'string' || options.vmstateDisk === '')) {
    throw new TypeError(`Expected a disk name for options.vmstateDisk, received ${String(options.vmstateDisk)}`);
  }
  return options;
}
