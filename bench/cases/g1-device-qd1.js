/** (g1) Diagnostic: the device reference with one 4 MiB write in flight at a time. */
import { deviceCase } from './g-device.js';

export default deviceCase({ id: 'g1', label: 'device: addon, 4 MiB O_DIRECT, 1 in flight', inFlight: 1 });
