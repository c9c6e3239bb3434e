/** Option checks of a live savevm: synchronous TypeErrors naming the option, before anything talks to QEMU. */
import { describe, validatePath } from '../validate.js';

interface LiveOptions {
  live?: boolean;
  stateImage?: string;
  vmstateDisk?: string;
}

export function validateLiveOptions<T extends LiveOptions>(options: T): T {
  if (options.live !== undefined && typeof options.live !== 'boolean') {
    throw new TypeError(`Expected a boolean for options.live, received ${describe(options.live)}`);
  }
  if (options.live === true) {
    if (options.stateImage === undefined) throw new TypeError('Expected a path for options.stateImage (a live savevm writes its vmstate there), received undefined');
    validatePath(options.stateImage, 'options.stateImage');
    if (options.vmstateDisk !== undefined) throw new TypeError(`Expected no options.vmstateDisk with options.live (the vmstate goes to options.stateImage), received ${describe(options.vmstateDisk)}`);
  } else if (options.stateImage !== undefined) {
    throw new TypeError(`Expected options.live: true with options.stateImage, received ${describe(options.live)} for options.live`);
  }
  return options;
}
