// Library: installed adapters, the selected one's sample prompts, add-local, training.
import {
  api,
  newTaskId,
  toApiError,
  type Adapter,
  type AdapterDetail,
  type ApiError,
  type TrainProgress,
  type TrainRequest,
} from '../api';
import { parseExamples, type LineError } from '../jsonl';
import { errors } from './errors.svelte';

export class LibraryStore {
  adapters = $state<Adapter[]>([]);
  loading = $state(false);
  selected = $state<AdapterDetail | null>(null);
  /** Editable copy of the selected adapter's sample prompts. */
  samples = $state<string[]>([]);
  samplesDirty = $state(false);
  /** Adapter ids with a call running (toggle / remove / save). */
  pending = $state<Record<string, boolean>>({});
  addPath = $state('');
  addName = $state('');
  adding = $state(false);
  addError = $state<ApiError | null>(null);
  onChanged: () => void = () => {};

  async load(): Promise<void> {
    this.loading = true;
    try {
      this.adapters = await api.adaptersList();
    } catch (e) {
      errors.push('List adapters', e);
    } finally {
      this.loading = false;
    }
  }

  async select(id: string): Promise<void> {
    this.pending[id] = true;
    try {
      const d = await api.adapterGet(id);
      this.selected = d;
      this.samples = d.sample_list.map((s) => s.text);
      this.samplesDirty = false;
    } catch (e) {
      errors.push(`Open adapter ${id}`, e);
    } finally {
      delete this.pending[id];
    }
  }

  async setEnabled(id: string, enabled: boolean): Promise<void> {
    this.pending[id] = true;
    try {
      const a = await api.adapterSetEnabled(id, enabled);
      this.adapters = this.adapters.map((x) => (x.id === id ? a : x));
      if (this.selected?.id === id) this.selected.enabled = a.enabled;
    } catch (e) {
      errors.push(`${enabled ? 'Enable' : 'Disable'} ${id}`, e);
    } finally {
      delete this.pending[id];
    }
  }

  async remove(id: string): Promise<boolean> {
    this.pending[id] = true;
    try {
      await api.adapterRemove(id);
      this.adapters = this.adapters.filter((x) => x.id !== id);
      if (this.selected?.id === id) this.selected = null;
      this.onChanged();
      return true;
    } catch (e) {
      errors.push(`Remove ${id}`, e);
      return false;
    } finally {
      delete this.pending[id];
    }
  }

  // sample prompt list editing
  setSample(i: number, text: string): void {
    this.samples[i] = text;
    this.samplesDirty = true;
  }
  addSample(): void {
    this.samples = [...this.samples, ''];
    this.samplesDirty = true;
  }
  removeSample(i: number): void {
    this.samples = this.samples.filter((_, j) => j !== i);
    this.samplesDirty = true;
  }

  /** The prompts sent to adapter_set_samples: trimmed, blanks dropped. */
  get cleanSamples(): string[] {
    return this.samples.map((s) => s.trim()).filter(Boolean);
  }

  async saveSamples(): Promise<boolean> {
    const d = this.selected;
    if (!d) return false;
    this.pending[d.id] = true;
    try {
      const nd = await api.adapterSetSamples(d.id, this.cleanSamples);
      this.selected = nd;
      this.samples = nd.sample_list.map((s) => s.text);
      this.samplesDirty = false;
      this.adapters = this.adapters.map((x) => (x.id === nd.id ? { ...x, samples: nd.samples } : x));
      return true;
    } catch (e) {
      errors.push(`Save sample prompts of ${d.id}`, e);
      return false;
    } finally {
      delete this.pending[d.id];
    }
  }

  async addLocal(): Promise<Adapter | null> {
    const path = this.addPath.trim();
    if (!path) return null;
    this.adding = true;
    this.addError = null;
    try {
      const a = await api.adapterAddLocal({ path, name: this.addName.trim() || null });
      this.adapters = [...this.adapters.filter((x) => x.id !== a.id), a];
      this.addPath = '';
      this.addName = '';
      this.onChanged();
      return a;
    } catch (e) {
      this.addError = toApiError(e);
      return null;
    } finally {
      this.adding = false;
    }
  }
}

export interface TrainForm {
  name: string;
  source: 'path' | 'inline';
  examplesPath: string;
  examplesText: string;
  steps: number;
  rank: number;
  alpha: number;
  lr: number;
  batch: number;
  template: 'alpaca' | 'chat';
}

export class TrainStore {
  form = $state<TrainForm>({
    name: '',
    source: 'inline',
    examplesPath: '',
    examplesText: '',
    steps: 60,
    rank: 8,
    alpha: 16,
    lr: 0.001,
    batch: 4,
    template: 'chat',
  });
  running = $state(false);
  taskId = $state<string | null>(null);
  progress = $state<TrainProgress | null>(null);
  /** Loss per step, for the live curve. */
  losses = $state<{ step: number; loss: number }[]>([]);
  error = $state<ApiError | null>(null);
  result = $state<Adapter | null>(null);
  cancelled = $state(false);

  /** Client-side validation; [] when the form can be sent. */
  validate(): LineError[] {
    const f = this.form;
    const errs: LineError[] = [];
    if (!f.name.trim()) errs.push({ line: 0, message: 'give the adapter a name' });
    if (!/^[A-Za-z0-9][A-Za-z0-9 ._-]*$/.test(f.name.trim()) && f.name.trim())
      errs.push({ line: 0, message: 'the name may use letters, digits, space, ".", "_" and "-"' });
    if (f.source === 'path') {
      if (!f.examplesPath.trim()) errs.push({ line: 0, message: 'give the path of a JSONL file' });
    } else {
      const p = parseExamples(f.examplesText);
      errs.push(...p.errors);
      if (!p.errors.length && !p.examples.length) errs.push({ line: 0, message: 'give at least one example line' });
    }
    const int = (v: number, lo: number, hi: number, what: string) => {
      if (!Number.isInteger(v) || v < lo || v > hi) errs.push({ line: 0, message: `${what} must be a whole number in ${lo}..${hi}` });
    };
    int(f.steps, 1, 100000, 'steps');
    int(f.rank, 1, 256, 'rank');
    int(f.batch, 1, 256, 'batch');
    if (!(f.alpha > 0)) errs.push({ line: 0, message: 'alpha must be positive' });
    if (!(f.lr > 0 && f.lr < 1)) errs.push({ line: 0, message: 'learning rate must be in (0, 1)' });
    return errs;
  }

  buildRequest(): TrainRequest {
    const f = this.form;
    const inline = f.source === 'inline';
    return {
      name: f.name.trim(),
      examples_path: inline ? null : f.examplesPath.trim(),
      examples: inline ? parseExamples(f.examplesText).examples : null,
      steps: f.steps,
      rank: f.rank,
      alpha: f.alpha,
      lr: f.lr,
      batch: f.batch,
      template: f.template,
    };
  }

  async start(onDone?: (a: Adapter) => void): Promise<Adapter | null> {
    if (this.running || this.validate().length) return null;
    const taskId = newTaskId('train');
    this.taskId = taskId;
    this.running = true;
    this.error = null;
    this.result = null;
    this.cancelled = false;
    this.progress = null;
    this.losses = [];
    try {
      const a = await api.adapterTrain(this.buildRequest(), taskId, (p) => {
        this.progress = p;
        this.losses = [...this.losses, { step: p.step, loss: p.loss }];
      });
      this.result = a;
      onDone?.(a);
      return a;
    } catch (e) {
      const err = toApiError(e);
      if (err.code === 'cancelled') this.cancelled = true;
      else this.error = err;
      return null;
    } finally {
      this.running = false;
      this.taskId = null;
    }
  }

  async cancel(): Promise<void> {
    if (!this.taskId) return;
    try {
      await api.taskCancel(this.taskId);
    } catch (e) {
      errors.push('Cancel training', e);
    }
  }
}
