// The data the desktop shell (src-tauri) exchanges with the UI. Every DTO, event, error code and
// shared constant (MAX_K, DEFAULT_K, PLAN_CHOICES, PLAN_HINTS, ERROR_CODES) is generated from the
// Rust types (generated.ts): this file only adds what the UI alone needs, never a second copy.
export * from './generated';

/** Shown next to a plan select while `router` is chosen. */
export const ROUTER_HINT = 'needs a trained router for the active base';
