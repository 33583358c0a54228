// The web client's room-grant parser (web/studyhall.js), which the dev sign-in form uses:
// `room:role` and `room=role` both work, as in `studyhall token --rooms`, and a malformed
// entry throws an error that names it and the expected syntax. Plain Node, no browser.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseRoomGrants } from '../../web/studyhall.js';

test('room grants take either separator, and member when the role is left out', () => {
  assert.deepEqual(parseRoomGrants('lobby:host, algebra=ta physics'), {
    lobby: 'host', algebra: 'ta', physics: 'member',
  });
  assert.deepEqual(parseRoomGrants(''), {});
});

test('a malformed grant names the entry and the expected syntax', () => {
  for (const bad of ['lobby:boss', 'lobby:host:ta', 'lobby=', ':host', 'a/b:host']) {
    assert.throws(() => parseRoomGrants(bad), (e) => {
      assert.match(e.message, new RegExp(`"${bad.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}"`));
      assert.match(e.message, /room:role or room=role/);
      return true;
    });
  }
});
