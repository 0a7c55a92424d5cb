//! NovaCron's policy engine (pure): policy documents read strictly with file/line/column errors
//! ([`parse_policies`]), checked one by one ([`validate`]) and as a set ([`conflicts`],
//! [`resolve`]), and turned into the constraints and preferences the planners apply
//! ([`enforce`]). `docs/policies.md` describes the language.

pub mod check;
pub mod conflicts;
pub mod enforce;
pub mod observe;
pub mod parse;

pub use check::{Problem, validate};
pub use conflicts::{Conflict, Resolution, conflicts, prevails, resolve, specificity, unknown_groups};
pub use parse::{ParseError, parse_policies};
