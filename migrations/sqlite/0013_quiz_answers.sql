-- Quiz answers (sqlite). Keep in step with the PostgreSQL file of the same version: same
-- tables and columns.

-- The answerer's display name when they answered, for `poll_answers`, the results export and
-- the quiz leaderboard ('' for answers stored before this version: the user id stands in).
ALTER TABLE poll_answers ADD COLUMN user_name TEXT NOT NULL DEFAULT '';
-- Quizzes only: 1 when the answer's choice set equals the quiz's `correct`, else 0; set when
-- the quiz closes (NULL while it is open, and for polls and word clouds).
ALTER TABLE poll_answers ADD COLUMN correct INTEGER;
-- Quizzes closed before this version: their answers judged now. Both sides are the JSON of a
-- sorted index list (single-choice quizzes always; a multiple-choice `correct` given out of
-- order is judged wrong here, and sorted from this version on).
UPDATE poll_answers SET correct = CASE WHEN choices =
    (SELECT p.correct FROM polls p WHERE p.id = poll_answers.poll_id) THEN 1 ELSE 0 END
WHERE poll_id IN (SELECT id FROM polls WHERE kind = 'quiz' AND state = 'closed');
-- The quiz leaderboard reads a room's closed quizzes.
CREATE INDEX polls_room_closed ON polls (room_id, kind) WHERE state = 'closed';
