import { defineConfig } from 'vitest/config';
import { svelte } from '@sveltejs/vite-plugin-svelte';

// Tauri loads ui/dist from disk: relative asset paths, no network at runtime.
export default defineConfig(({ mode }) => ({
  base: './',
  plugins: [svelte()],
  // Tests mount components in jsdom: resolve Svelte's browser (client) build, not the server one.
  resolve: mode === 'test' ? { conditions: ['browser'] } : undefined,
  clearScreen: false,
  server: { port: 1420, strictPort: true },
  preview: { port: 4173, strictPort: true },
  build: { outDir: 'dist', target: 'es2022', chunkSizeWarningLimit: 1200 },
  test: {
    environment: 'jsdom',
    include: ['src/**/*.test.ts'],
  },
}));
