// A small LayerGates fixture (plan `router`) shared by the layer-gate tests.
import type { GenerationRecord, LayerGates, Provenance, ServedAdapter } from '../lib/api';

/** 4 layers × 5 token columns × 3 adapters; argmax differs between cells. */
export function layerGatesFixture(): LayerGates {
  return {
    adapters: ['sql-lora', 'poetry-lora', 'math-lora'],
    layers: 4,
    tokens: ['<prompt>', 'Bon', 'jour', ' le', 'ing the'],
    gates: [
      [[0.41, 0.33, 0.26], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.34, 0.33, 0.33]],
      [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]],
      [[0.333, 0.333, 0.334], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.45, 0.1, 0.45]],
      [[0.2, 0.3, 0.5], [0.3, 0.3, 0.4], [0.6, 0.35, 0.05], [0.05, 0.6, 0.35], [0.35, 0.05, 0.6]],
    ],
  };
}

/** The reply's adapters; the highest mean gate is poetry-lora's (not the first column). */
export function servedFixture(): ServedAdapter[] {
  return [
    { id: 'sql-lora', name: 'SQL writer', score: 0.71, gate: 0.3 },
    { id: 'poetry-lora', name: 'Poetry', score: 0.64, gate: 0.45 },
    { id: 'math-lora', name: 'Math tutor', score: 0.52, gate: 0.25 },
  ];
}

/** The record of a finished reply (a stored router reply carries one). */
export function generationFixture(): GenerationRecord {
  return {
    max_tokens: 64, temperature: 0.2, top_p: 0.8, top_k: 0, seed: 7, stop: [],
    prompt_tokens: 12, generated_tokens: 4, finish_reason: 'eos', dropped_messages: 0,
  };
}

export function routerProvenance(layer_gates: unknown = layerGatesFixture()): Provenance {
  return {
    plan: 'router', k: 3, query: 'Bonjour', base_model: 'b', embedder: null, scoring: 'cosine', gating: null,
    adapters: servedFixture(), generation: generationFixture(), layer_gates: layer_gates as LayerGates | null,
  };
}
